"""Parity with diffusers' PyTorch AutoencoderKL on random weights (test extra: torch).

Random diffusers models are saved with save_pretrained (safetensors), loaded into our
Flax model, and must agree on encode (posterior mean and logvar) and decode to 1e-4.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tfusion.autoencoders import diffusers_weights, jit_decode, jit_encode  # noqa: E402

CONFIGS = {
    # SD-VAE-like: 4 latent channels, quant convs, mid attention.
    "f4c4": dict(block_out_channels=(8, 16, 16), latent_channels=4, layers_per_block=1,
                 norm_num_groups=4, scaling_factor=0.18215),
    # FLUX-like: 16 channels, shift, no quant convs, two resnets per level.
    "f2c16": dict(block_out_channels=(8, 16), latent_channels=16, layers_per_block=2,
                  norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False),
}


def _diffusers_vae(kwargs, directory):
    n = len(kwargs["block_out_channels"])
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **kwargs).eval()
    with torch.no_grad():  # GroupNorm inits to (1, 0); perturb so the test sees them
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    vae.save_pretrained(directory, safe_serialization=True)
    return vae


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_decode_match_diffusers(name, tmp_path):
    kwargs = CONFIGS[name]
    vae = _diffusers_vae(kwargs, tmp_path)
    ours = diffusers_weights.load_pretrained(str(tmp_path))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
        ref_mean = dist.mean.numpy().transpose(0, 2, 3, 1)
        ref_logvar = dist.logvar.numpy().transpose(0, 2, 3, 1)
        z = np.random.default_rng(1).normal(size=ref_mean.shape).astype(np.float32)
        ref_images = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
    post = ours.posterior(images)
    np.testing.assert_allclose(post.mean, ref_mean, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(post.logvar, ref_logvar, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.decode_z(z), ref_images.transpose(0, 2, 3, 1),
                               atol=1e-4, rtol=1e-4)
    # Scaled, jitted API: latent = (mean - shift) * scale; decode inverts it.
    scale, shift = kwargs["scaling_factor"], kwargs.get("shift_factor") or 0.0
    latents = np.asarray(jit_encode(ours)(images))
    np.testing.assert_allclose(latents, (ref_mean - shift) * scale, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(jit_decode(ours)((z - shift) * scale),
                               ref_images.transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_our_weights_load_in_diffusers(tmp_path):
    """save_pretrained writes a directory diffusers reads back to the same outputs."""
    from flax import nnx

    from tfusion.autoencoders import AutoencoderKL, AutoencoderConfig

    cfg = AutoencoderConfig(block_out_channels=(8, 16), latent_channels=4, layers_per_block=1,
                            norm_num_groups=4)
    ours = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    diffusers_weights.save_pretrained(ours, str(tmp_path))
    vae = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
    images = np.random.default_rng(0).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        ref = vae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist.mean
    np.testing.assert_allclose(ours.posterior(images).mean, ref.numpy().transpose(0, 2, 3, 1),
                               atol=1e-4, rtol=1e-4)


FULL_SIZE = {  # the published shapes; widths (128, 256, 512, 512), 2 resnets per level
    "sd_f8c4": dict(latent_channels=4, scaling_factor=0.18215),
    "flux_f8c16": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                       use_quant_conv=False, use_post_quant_conv=False),
    "paper_f8c8": dict(latent_channels=8),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_state_dict_names_and_shapes(name):
    """Every tensor of diffusers' full-size model lands on one of our parameters with the
    right (converted) shape, and every parameter is covered; no weights materialised."""
    from flax import nnx

    from tfusion.autoencoders import AutoencoderKL, from_diffusers_dict

    kwargs = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, **FULL_SIZE[name])
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**kwargs)
    cfg = from_diffusers_dict(dict(reference.config))
    assert cfg.latent_shape(256) == (32, 32, kwargs["latent_channels"])
    ours = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    covered = set()
    for key, tensor in reference.state_dict().items():
        var, leaf = diffusers_weights._resolve(ours, key)
        fake = np.broadcast_to(np.float32(0), tuple(tensor.shape))  # no memory
        assert diffusers_weights._to_ours(fake, leaf).shape == var.shape, key
        covered.add(id(var))
    n_ours = len(nnx.to_flat_state(nnx.state(ours, nnx.Param)))
    assert len(covered) == n_ours == len(reference.state_dict())
