"""Condition images (tfusion.batch.CONDITION): clean, no diffusion loss, attended like
any image, and what training sees equals what generation's cache holds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers.inference_helpers import TOL, random_tokens, tiny_engine
from tests.helpers.numpy_reference import numpy_text_nll
from tfusion import losses
from tfusion.batch import (CONDITION, BatchContractError, BatchSpec, ImageSegment,
                           assemble_rows, validate_batch)
from tfusion.inference.engine import Engine
from tfusion.inference.prompts import layout_prompts
from tfusion.inference.steps import CacheColumns
from tfusion.train.step import Objective, global_counts


def _edit_batch(cfg, rng, t_max_output):
    """Two rows: an edit document (condition input, target output) beside a plain
    caption -> image document, plus a second edit document in row 1."""
    shape = (cfg.latent_height, cfg.latent_width, cfg.latent_channels)
    image = lambda t_max: ImageSegment(rng.normal(size=shape).astype(np.float32), t_max)
    edit = lambda: [random_tokens(rng, 2, cfg.vocab_size), image(CONDITION),
                    random_tokens(rng, 4, cfg.vocab_size), image(t_max_output),
                    random_tokens(rng, 2, cfg.vocab_size)]
    pair = [random_tokens(rng, 3, cfg.vocab_size), image(t_max_output),
            random_tokens(rng, 2, cfg.vocab_size)]
    spec = BatchSpec(2, 96, 3, shape, cfg.patch_size)
    batch = assemble_rows([[edit()], [pair, edit()]], spec, cfg.pad_id)
    validate_batch(batch, spec, cfg.pad_id)
    return batch, spec


def test_condition_gets_no_noise_and_no_loss_numpy_reference():
    _, model, config = tiny_engine()
    cfg = config.model
    batch, _ = _edit_batch(cfg, np.random.default_rng(0), 999)
    condition = batch["image_t_max"] == CONDITION
    assert condition.sum() == 2 and (batch["image_mask"] & ~condition).sum() == 3
    objective = Objective(nnx.split(model)[0], config)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    draw = objective.draw_noise(jb, jax.random.key(3))
    noisy, model_t = np.asarray(draw.noisy), np.asarray(draw.model_t)
    np.testing.assert_array_equal(noisy[condition], batch["images"][condition])  # clean
    np.testing.assert_array_equal(model_t[condition], 0.0)
    targets = batch["image_mask"] & ~condition
    assert np.all(np.abs(noisy[targets] - batch["images"][targets]) > 0)  # targets noised

    # The loss against a numpy reference: mean over target images of their MSE.
    logits, pred = model(jb, draw.noisy, draw.model_t)
    sums = objective.sums_given_noise(nnx.split(model)[1], jb, draw)
    per_image = np.mean((np.asarray(pred, np.float64) - np.asarray(draw.target)) ** 2,
                        axis=(2, 3, 4))
    np.testing.assert_allclose(float(sums["ddpm_sum"]), per_image[targets].sum(), rtol=1e-5)
    assert float(sums["ddpm_count"]) == targets.sum() == float(global_counts(jb)["ddpm_count"])
    lm_sum, lm_count = numpy_text_nll(np.asarray(logits), batch)
    np.testing.assert_allclose(float(sums["lm_sum"]), lm_sum, rtol=1e-5)
    assert float(sums["lm_count"]) == lm_count

    # Gradient of the loss w.r.t. the prediction: zero at condition slots only.
    grad = jax.grad(lambda p: losses.combine(
        losses.transfusion_sums(logits, p, draw.target, jb), 5.0)["loss"])(pred)
    per_slot = np.abs(np.asarray(grad)).sum(axis=(2, 3, 4))
    assert np.all(per_slot[condition] == 0) and np.all(per_slot[targets] > 0)


def test_negative_t_max_below_condition_is_refused():
    _, _, config = tiny_engine()
    batch, spec = _edit_batch(config.model, np.random.default_rng(1), 999)
    batch["image_t_max"][0, 0] = -2
    with pytest.raises(BatchContractError, match="image_t_max"):
        validate_batch(batch, spec, config.model.pad_id)


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_generation_with_image_prompt_equals_teacher_forced_edit(process):
    """The cache after the prompt BOS BOI <input> EOI instruction BOI holds the clean
    input; the first denoising prediction of the output equals the training forward of
    the whole edit document at the output's drawn time."""
    _, model, config = tiny_engine()
    config.diffusion.update(process=process, sampler="ddpm" if process == "ddpm" else "euler",
                            prediction="eps" if process == "ddpm" else "v")
    engine = Engine(model, config.diffusion)
    cfg = config.model
    rng = np.random.default_rng(2)
    shape = (cfg.latent_height, cfg.latent_width, cfg.latent_channels)
    source = rng.normal(size=shape).astype(np.float32)
    target = rng.normal(size=shape).astype(np.float32)
    head, words = random_tokens(rng, 2, cfg.vocab_size), random_tokens(rng, 5, cfg.vocab_size)
    doc = [head, ImageSegment(source, CONDITION), words,
           ImageSegment(target, 999), random_tokens(rng, 2, cfg.vocab_size)]
    p = engine.patches_per_image
    spec = BatchSpec(1, 4 + 2 * p + 11, 2, shape, cfg.patch_size)
    batch = {k: jnp.asarray(v) for k, v in assemble_rows([[doc]], spec, cfg.pad_id).items()}
    draw = Objective(nnx.split(model)[0], config).draw_noise(batch, jax.random.key(7))
    logits, pred = model(batch, draw.noisy, draw.model_t)

    prompt = [head, source, words]  # a clean latent in a prompt: generation's image prompt
    lay = layout_prompts([prompt], engine.latent_shape, cfg.patch_size, cfg.pad_id)
    cache = engine.new_cache(1, spec.seq_len + 8)
    block = CacheColumns(*(jnp.asarray(lay[k]) for k in ("positions", "segment_ids", "slot")))
    prompt_logits, cache = engine.prefill(cache, jnp.asarray(lay["tokens"]), block,
                                          jnp.asarray(lay["image_index"]),
                                          jnp.asarray(lay["images"]))
    n = int(lay["lengths"][0])
    np.testing.assert_allclose(np.asarray(prompt_logits[0]), np.asarray(logits[0, n - 1]),
                               atol=TOL)
    out_block = CacheColumns(jnp.asarray(n + np.arange(p))[None], jnp.ones((1, p), jnp.int32),
                             jnp.full((1, p), n, jnp.int32))
    first, _ = engine.predict(cache, draw.noisy[:, 1], draw.model_t[:, 1], out_block)
    np.testing.assert_allclose(np.asarray(first), np.asarray(pred[:, 1]), atol=TOL)
