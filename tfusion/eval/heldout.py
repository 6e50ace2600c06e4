"""Held-out text perplexity and diffusion loss at fixed timesteps.

Both come from the training loss's own sums (tfusion.losses), so "perplexity" is
exactly exp(mean next-token NLL over the positions the LM loss trains on).

  * Text: images are given clean (t = 0), the way inference conditions text on
    an image it has read or finished generating; the training loss instead sees
    images at a random t, so it is a noisier, slightly pessimistic estimate.
  * Diffusion: the epsilon MSE at each of a fixed set of timesteps, with the same
    noise at every t (common random numbers: the curve over t is smooth and two
    checkpoints see identical noise), instead of the training loss's random t,
    whose batch-to-batch variance hides small differences.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfusion import diffusion, losses
from tfusion.config import image_token_offset

# Fractions of T; 0.1 T .. 0.9 T covers detail (low t) to layout (high t).
DEFAULT_T_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)


def default_timesteps(num_train_steps: int) -> tuple[int, ...]:
    return tuple(int(round(f * (num_train_steps - 1))) for f in DEFAULT_T_FRACTIONS)


class HeldoutEvaluator:
    """Jitted loss sums of one batch at a given t; add over batches, then finish()."""

    def __init__(self, model: nnx.Module, config, timesteps: Optional[Sequence[int]] = None):
        self.graphdef, self.params = nnx.split(model)
        self.alpha_bar = jnp.asarray(
            diffusion.alphas_cumprod(diffusion.make_betas(config.diffusion)), jnp.float32)
        self.timesteps = tuple(timesteps if timesteps is not None
                               else default_timesteps(config.diffusion.num_train_steps))
        self.image_token_offset = image_token_offset(config.model)
        self._sums = jax.jit(self._batch_sums)

    def _batch_sums(self, params, batch, t_value, noise):
        model = nnx.merge(self.graphdef, params)
        t = jnp.full(batch["image_mask"].shape, t_value, jnp.int32)
        # t < 0 means "clean images" (the text pass); the model still sees t = 0.
        noisy = jnp.where(t_value < 0, batch["images"],
                          diffusion.q_sample(batch["images"], jnp.maximum(t, 0), noise,
                                             self.alpha_bar))
        logits, eps = model(batch, noisy, jnp.maximum(t, 0))
        return losses.transfusion_sums(logits, eps, noise, batch,
                                       image_token_offset=self.image_token_offset)

    def batch_sums(self, batch: dict, rng: jax.Array) -> dict:
        """{"text": sums with clean images, "t<t>": sums at t for each fixed t}."""
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        noise = jax.random.normal(rng, batch["images"].shape, jnp.float32)
        out = {"text": self._sums(self.params, batch, -1, noise)}
        for t in self.timesteps:
            out[f"t{t}"] = self._sums(self.params, batch, t, noise)
        return jax.device_get(out)

    def evaluate(self, batches: Iterable[dict], seed: int = 0, progress=None) -> dict:
        """Metrics over all batches (see finish()); progress wraps the iterable (tqdm)."""
        key = jax.random.key(seed)
        total = None
        iterable = progress(batches) if progress else batches
        for i, batch in enumerate(iterable):
            sums = self.batch_sums(batch, jax.random.fold_in(key, i))
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        if total is None:
            raise ValueError("no held-out batches")
        return self.finish(total)

    def finish(self, total: dict) -> dict:
        text = total["text"]
        # Text pairs only (for the discrete baseline: image codes excluded), no z-loss.
        count = float(text["text_count"])
        nll = float(text["text_nll_sum"]) / count if count else float("nan")
        out = {"text_nll": nll, "perplexity": math.exp(nll) if count else float("nan"),
               "text_targets": int(count), "images": int(text["ddpm_count"])}
        per_t = []
        for t in self.timesteps:
            images = float(total[f"t{t}"]["ddpm_count"])
            value = float(total[f"t{t}"]["ddpm_sum"]) / images if images else float("nan")
            out[f"diffusion_loss_t{t}"] = value
            per_t.append(value)
        out["diffusion_loss_mean"] = float(np.mean(per_t)) if per_t else float("nan")
        return out


def heldout_metrics(model: nnx.Module, batches: Iterable[dict], config,
                    timesteps: Optional[Sequence[int]] = None, seed: int = 0,
                    progress=None) -> dict:
    """Perplexity (clean images) and diffusion loss at fixed t over held-out batches.

    Returns {"perplexity", "text_nll", "text_targets", "images",
             "diffusion_loss_t<t>" for each t, "diffusion_loss_mean"}.
    """
    return HeldoutEvaluator(model, config, timesteps).evaluate(batches, seed, progress)
