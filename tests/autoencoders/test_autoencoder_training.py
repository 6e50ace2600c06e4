"""Autoencoder losses, config validation, and (slow) a few training steps on shapes."""
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion.autoencoders import Posterior, losses
from tfusion.config import ConfigError


def test_psnr_and_kl_match_formulas():
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    recon = np.clip(target + rng.normal(0, 0.1, target.shape), -1, 1).astype(np.float32)
    mse01 = (((recon - target) / 2) ** 2).reshape(2, -1).mean(-1)
    np.testing.assert_allclose(losses.psnr(recon, target), np.mean(-10 * np.log10(mse01)),
                               rtol=1e-5)
    mean = rng.normal(size=(2, 2, 2, 4)).astype(np.float32)
    logvar = rng.normal(size=mean.shape).astype(np.float32)
    kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).reshape(2, -1).sum(-1).mean() / 48
    np.testing.assert_allclose(losses.kl_loss(Posterior(jnp.asarray(mean), jnp.asarray(logvar)),
                                              48), kl, rtol=1e-5)


@pytest.mark.parametrize("field, value", [("kind", "gan"), ("reconstruction", "l3"),
                                          ("norm_num_groups", 5), ("kl_weight", -1.0)])
def test_validation_names_the_field(field, value):
    from experiments.autoencoders import vae_shapes_tiny
    from tfusion.autoencoders.train_config import validate

    config = vae_shapes_tiny()
    validate(config)
    config.autoencoder[field] = value
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert err.value.field == f"autoencoder.{field}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vae", "vq"])
def test_training_steps_reduce_reconstruction_loss(kind):
    """A few steps on one repeated 16 px batch, the adversarial term on from step 3."""
    # Not launch.train_autoencoder's helpers: importing two absl entry points into one
    # process (pytest) defines --config twice.
    from flax import nnx

    from data_pipelines import sources
    from data_pipelines.images import prepare_image
    from experiments.autoencoders import vae_shapes_tiny
    from tfusion.autoencoders import AutoencoderKL, VQModel
    from tfusion.autoencoders.train_config import architecture, loss_config
    from tfusion.autoencoders.training import AutoencoderTrainer

    config = vae_shapes_tiny()
    config.data.image_size = 16
    config.autoencoder.update(kind=kind, block_out_channels=(8, 16), norm_num_groups=4,
                              num_vq_embeddings=32, adv_weight=0.1, adv_start_step=3,
                              discriminator_channels=8)
    records = sources.image_source(config.data, "train")
    images = np.stack([prepare_image(records[i].image, 16)[0] for i in range(4)])
    model = (AutoencoderKL if kind == "vae" else VQModel)(architecture(config.autoencoder),
                                                          rngs=nnx.Rngs(0))
    trainer = AutoencoderTrainer(model, loss_config(config.autoencoder), 3e-3,
                                 discriminator_channels=8)
    history = [trainer.step(images, step) for step in range(1, 9)]
    assert "loss_disc" not in history[0] and "loss_disc" in history[-1]
    assert history[-1]["loss_rec"] < history[0]["loss_rec"]
    assert all(np.isfinite(m["loss"]) for m in history)
    if kind == "vq":
        assert 0 < history[-1]["codebook_used"] <= 1
