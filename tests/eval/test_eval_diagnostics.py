"""Denoising skill by noise level and cross-modal gaps, on stand-in models with known answers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.packed_batches import random_batch, tiny_config
from tfusion import diffusion
from tfusion.eval.heldout import HeldoutEvaluator, permute_slots, roll_permutation


def _batches(config, n=3):
    return [random_batch(seed, config.model, batch_size=3, seq_len=48, max_images=3,
                         as_jax=False)[0] for seed in range(n)]


def _config(process="ddpm", prediction="eps"):
    config = tiny_config()
    config.diffusion.update(process=process, prediction=prediction,
                            sampler="ddpm" if process == "ddpm" else "euler")
    return config


def _text_logits(batch, vocab):
    """Logits that depend on the tokens only (never on an image)."""
    tok = batch["tokens"]
    return jax.nn.one_hot((tok * 7 + 3) % vocab, vocab) * 2.0 + 0.01 * tok[..., None]


def _stand_in(config, x0_of):
    """model_fn whose x0 estimate is x0_of(batch, noisy), expressed in the config's prediction."""
    process = diffusion.NoiseProcess(config.diffusion)

    def model_fn(params, batch, noisy, model_t):
        times = model_t.astype(jnp.int32) if process.process == "ddpm" else model_t / 999.0
        a, s = process.coefficients(times)
        a = diffusion.broadcast_to_latents(a, noisy)
        s = diffusion.broadcast_to_latents(s, noisy)
        x0 = x0_of(batch, noisy)
        eps = (noisy - a * x0) / s
        pred = diffusion.target_of(x0, eps, a, s, process.prediction, process.process)
        return _text_logits(batch, config.model.vocab_size), pred

    return model_fn


@pytest.mark.parametrize("process,prediction", [("ddpm", "eps"), ("ddpm", "v"), ("flow", "v")])
def test_perfect_denoiser_scores_zero_and_mean_predictor_one(process, prediction):
    config = _config(process, prediction)
    batches = _batches(config)
    real = np.concatenate([b["images"][b["image_mask"]] for b in batches])
    mean_image = jnp.asarray(real.mean(axis=0))
    perfect = HeldoutEvaluator(None, config, model_fn=_stand_in(config, lambda b, x: b["images"]))
    out = perfect.evaluate({}, batches)
    skills = [v for k, v in out.items() if k.startswith("denoise_skill/")]
    assert len(skills) == 10
    assert max(skills) < 1e-3, skills
    mean = HeldoutEvaluator(None, config, model_fn=_stand_in(
        config, lambda b, x: jnp.broadcast_to(mean_image, b["images"].shape)))
    out = mean.evaluate({}, batches)
    skills = np.asarray([v for k, v in out.items() if k.startswith("denoise_skill/")])
    np.testing.assert_allclose(skills, 1.0, atol=2e-3)
    # The reference itself: per-pixel variance around the mean image.
    assert out["mean_predictor_x0_mse"] == pytest.approx(np.mean((real - real.mean(0)) ** 2),
                                                         rel=1e-4)


def test_models_that_ignore_the_other_modality_have_zero_gaps():
    config = _config()
    batches = _batches(config)
    # The x0 estimate is a function of the noisy image alone; the logits of the tokens alone.
    blind = HeldoutEvaluator(None, config, model_fn=_stand_in(config, lambda b, x: 0.5 * x))
    out = blind.evaluate({}, batches)
    assert out["image_x0_mse_true_caption"] > 0 and out["caption_nll_true_image"] > 0
    assert abs(out["image_caption_gap"]) < 1e-5
    assert abs(out["caption_image_gap"]) < 1e-5


def test_gaps_are_positive_for_models_that_read_the_other_modality():
    config = _config()
    batches = _batches(config)

    def reads_caption(b, x):
        # Knows each slot's own image only through its document's tokens: the true image
        # where the slot holds the image its caption was written for.
        return b["images"] + 0.0 * x

    def model_fn(params, batch, noisy, model_t):
        logits, pred = _stand_in(config, reads_caption)(params, batch, noisy, model_t)
        # Text reads the image: logits shift with the mean of the row's images.
        shift = jnp.mean(noisy, axis=(1, 2, 3, 4))[:, None, None]
        return logits + shift * jax.nn.one_hot(batch["tokens"], logits.shape[-1]) * 5, pred

    # x0_of uses the batch's original images (what the caption describes), so after
    # the roll the estimate is wrong for the moved image: a large image gap.
    out = HeldoutEvaluator(None, config, model_fn=model_fn).evaluate({}, batches)
    assert out["image_caption_gap"] > 0.5
    assert out["caption_image_gap"] != 0


def test_roll_moves_real_images_only():
    mask = jnp.asarray([[True, False, True], [True, False, False]])
    perm = np.asarray(roll_permutation(mask))
    np.testing.assert_array_equal(perm, [2, 1, 3, 0, 4, 5])
    x = jnp.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(np.asarray(permute_slots(x, jnp.asarray(perm))),
                                  [[2, 1, 3], [0, 4, 5]])
