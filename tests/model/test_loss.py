"""The Transfusion loss against an independent numpy implementation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.numpy_reference import numpy_text_nll
from tests.helpers.packed_batches import random_batch, tiny_config, tiny_model_config
from tfusion import losses
from tfusion.batch import BatchSpec, assemble_rows
from tfusion.model.transfusion import Transfusion
from tfusion.train.step import Objective


def numpy_loss(logits, eps_pred, noise, batch, lam, z=0.0):
    tok = batch["tokens"]
    total, count = numpy_text_nll(logits, batch, z)
    mses = [np.mean((eps_pred[r, m] - noise[r, m]) ** 2)
            for r in range(tok.shape[0]) for m in range(batch["image_mask"].shape[1])
            if batch["image_mask"][r, m]]
    lm = total / count if count else 0.0
    ddpm = np.mean(mses) if mses else 0.0
    return lm + lam * ddpm, lm, ddpm


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_loss_matches_numpy(seed, z_loss):
    cfg = tiny_model_config()
    batch, _, spec = random_batch(seed, cfg, batch_size=3, seq_len=40, max_images=3,
                                  as_jax=False)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, 40, cfg.vocab_size)).astype(np.float32) * 3
    eps = rng.normal(size=batch["images"].shape).astype(np.float32)
    noise = rng.normal(size=batch["images"].shape).astype(np.float32)
    sums = losses.transfusion_sums(jnp.asarray(logits), jnp.asarray(eps), jnp.asarray(noise),
                                   {k: jnp.asarray(v) for k, v in batch.items()}, z_loss)
    got = losses.combine(sums, 5.0)
    want = numpy_loss(logits, eps, noise, batch, 5.0, z_loss)
    np.testing.assert_allclose([got["loss"], got["loss_lm"], got["loss_diffusion"]], want,
                               rtol=1e-5)
    assert float(sums["ddpm_count"]) == batch["image_mask"].sum()


def test_empty_slots_contribute_nothing():
    cfg = tiny_model_config()
    batch, _, _ = random_batch(0, cfg, batch_size=3, seq_len=40, max_images=3, as_jax=False)
    assert not batch["image_mask"].all()
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 40, cfg.vocab_size)).astype(np.float32))
    eps = rng.normal(size=batch["images"].shape).astype(np.float32)
    noise = rng.normal(size=batch["images"].shape).astype(np.float32)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    base = losses.combine(losses.transfusion_sums(logits, jnp.asarray(eps), jnp.asarray(noise), jb), 5.)
    eps[~batch["image_mask"]] = 1e6  # garbage predictions in empty slots
    other = losses.combine(losses.transfusion_sums(logits, jnp.asarray(eps), jnp.asarray(noise), jb), 5.)
    np.testing.assert_allclose(other["loss"], base["loss"], rtol=1e-6)


def test_extra_empty_slot_does_not_change_model_loss():
    """Same documents with M=2 and M=4 slots: identical loss (empty slots inert)."""
    config = tiny_config()
    cfg = config.model
    model = Transfusion(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    objective = Objective(graphdef, config)
    _, rows, spec = random_batch(3, cfg, batch_size=2, seq_len=40, max_images=2, as_jax=False)
    values = []
    for m in (2, 4):
        s = BatchSpec(2, 40, m, spec.latent_shape, spec.patch_size)
        b = {k: jnp.asarray(v) for k, v in assemble_rows(rows, s, cfg.pad_id).items()}
        # Same per-image t and noise: draw them for the 2 real-capable slots only.
        sums = objective_sums_with_fixed_noise(objective, params, b, m)
        values.append(losses.combine(sums, 5.0)["loss"])
    np.testing.assert_allclose(values[0], values[1], rtol=1e-5)


def objective_sums_with_fixed_noise(objective, params, batch, m):
    """Same noise for the two real-capable slots whatever M is; zeros beyond."""
    shape = batch["images"].shape
    noise = jax.random.normal(jax.random.key(7), (shape[0], 2) + shape[2:])
    noise = jnp.concatenate([noise, jnp.zeros((shape[0], m - 2) + shape[2:])], axis=1)
    t = jnp.full(shape[:2], 400, jnp.int32)
    return objective.sums_given_noise(params, batch, objective.process.at(batch["images"], t, noise))
