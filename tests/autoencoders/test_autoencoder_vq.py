"""VQ-VAE: quantizer losses and straight-through gradients against numpy; id round trips."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfusion.autoencoders import AutoencoderConfig, VQModel
from tfusion.autoencoders.vq import COMMITMENT_BETA, codebook_usage, nearest_code, quantize


def _numpy_reference(z, codebook, w):
    """Forward values and the gradients of sum(codes * w) + codebook + commitment."""
    flat = z.reshape(-1, z.shape[-1])
    dist = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1)
    ids = dist.argmin(-1)
    e = codebook[ids]
    n = flat.size
    mse = ((flat - e) ** 2).mean()
    # Straight-through: d/dz sum(codes * w) = w; the commitment term pulls z toward e.
    grad_z = w.reshape(flat.shape) + 2 * COMMITMENT_BETA * (flat - e) / n
    # Only the codebook term reaches the codebook: each used code moves toward its z.
    grad_codebook = np.zeros_like(codebook)
    np.add.at(grad_codebook, ids, 2 * (e - flat) / n)
    return (ids.reshape(z.shape[:-1]), mse, COMMITMENT_BETA * mse, e.reshape(z.shape),
            grad_z.reshape(z.shape), grad_codebook)


def test_quantizer_matches_numpy_reference():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 3, 4)).astype(np.float64)
    codebook = rng.normal(size=(8, 4)).astype(np.float64)
    w = rng.normal(size=z.shape).astype(np.float64)
    ids, cb_loss, commit, e, grad_z, grad_cb = _numpy_reference(z, codebook, w)

    def objective(z, codebook):
        q = quantize(z, codebook)
        return jnp.sum(q.codes * w) + q.codebook_loss + q.commitment_loss, q

    (_, q), (gz, gcb) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        jnp.asarray(z, jnp.float32), jnp.asarray(codebook, jnp.float32))
    np.testing.assert_array_equal(q.ids, ids)
    np.testing.assert_allclose(q.codes, e, atol=1e-6)  # forward value is the code
    np.testing.assert_allclose(q.codebook_loss, cb_loss, rtol=1e-5)
    np.testing.assert_allclose(q.commitment_loss, commit, rtol=1e-5)
    np.testing.assert_allclose(gz, grad_z, atol=1e-5)
    np.testing.assert_allclose(gcb, grad_cb, atol=1e-5)


def test_codebook_usage():
    ids = jnp.asarray([[0, 0, 1, 3]])
    usage = codebook_usage(ids, 8)
    assert float(usage["codebook_used"]) == 3 / 8
    p = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(usage["codebook_perplexity"], np.exp(-(p * np.log(p)).sum()),
                               rtol=1e-6)


def test_encode_decode_ids_round_trip():
    cfg = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                            norm_num_groups=4, num_vq_embeddings=32)
    model = VQModel(cfg, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    @nnx.jit  # one compile; eager conv nets are slow on CPU
    def run(model, images):
        ids = model.encode_ids(images)
        recon, q = model(images)
        return ids, recon, q.ids, model.decode_ids(ids)

    ids, recon, forward_ids, decoded = run(model, images)
    assert ids.shape == (2, 4, 4) and ids.dtype == jnp.int32
    codebook = model.quantize.embedding[...]
    # Codes of the ids quantize back to the same ids; decoding ids = the training forward
    # (whose straight-through codes z + (e - z) equal e up to rounding).
    np.testing.assert_array_equal(nearest_code(codebook[ids], codebook), ids)
    np.testing.assert_array_equal(forward_ids, ids)
    np.testing.assert_allclose(decoded, recon, atol=1e-5)
