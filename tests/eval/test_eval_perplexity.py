"""Held-out perplexity = exp(numpy cross-entropy of a tiny model's logits)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.numpy_reference import numpy_text_nll
from tests.helpers.packed_batches import random_batch, tiny_config
from tfusion import diffusion
from tfusion.eval.heldout import HeldoutEvaluator, heldout_metrics
from tfusion.model.transfusion import Transfusion


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    model = Transfusion(config.model, rngs=nnx.Rngs(0))
    batches = [random_batch(seed, config.model, batch_size=2, seq_len=32)[0] for seed in (0, 1)]
    return config, model, batches


def test_perplexity_is_exp_of_numpy_cross_entropy(tiny):
    config, model, batches = tiny
    total, count = 0.0, 0
    for batch in batches:
        # Text is scored with clean images at t = 0.
        logits, _ = model(batch, batch["images"], jnp.zeros(batch["image_mask"].shape, jnp.int32))
        s, c = numpy_text_nll(np.asarray(logits), batch)
        total, count = total + s, count + c
    out = heldout_metrics(model, batches, config, fractions=(0.01, 0.9))
    assert out["text_targets"] == count > 0
    assert out["perplexity"] == pytest.approx(np.exp(total / count), rel=1e-5)
    # An untrained model is close to uniform over the vocabulary.
    assert out["perplexity"] == pytest.approx(config.model.vocab_size, rel=0.2)


def test_diffusion_loss_at_fixed_t_uses_the_given_t_and_noise(tiny):
    config, model, batches = tiny
    evaluator, params = HeldoutEvaluator.for_model(model, config, fractions=(0.7,))
    t_value = int(evaluator.times[0])
    assert t_value == round(0.7 * 999)
    batch = batches[0]
    rng = jax.random.key(5)
    sums = evaluator.batch_sums(params, batch, rng)
    noise = jax.random.normal(rng, batch["images"].shape, jnp.float32)
    t = jnp.full(batch["image_mask"].shape, t_value, jnp.int32)
    ab = diffusion.alphas_cumprod(diffusion.cosine_betas(1000))[t_value]
    # The ddpm marginal written out in numpy, not the library's noising.
    noisy = np.sqrt(ab) * np.asarray(batch["images"]) + np.sqrt(1 - ab) * np.asarray(noise)
    _, eps = model(batch, jnp.asarray(noisy, jnp.float32), t)
    per_image = np.mean((np.asarray(eps) - np.asarray(noise)) ** 2, axis=(2, 3, 4))
    mask = np.asarray(batch["image_mask"])
    assert mask.sum() > 0
    assert float(sums["b0"]["ddpm_sum"]) == pytest.approx(per_image[mask].sum(), rel=1e-5)
