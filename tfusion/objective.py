"""The training objective as a pure function of parameters (what jax.grad sees)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tfusion import diffusion, losses
from tfusion.config import image_token_offset


class Objective:
    """Binds the static parts (graphdef, schedule, weights) of the Transfusion loss."""

    def __init__(self, graphdef: nnx.GraphDef, config):
        self.graphdef = graphdef
        self.alpha_bar = jnp.asarray(
            diffusion.alphas_cumprod(diffusion.make_betas(config.diffusion)), jnp.float32)
        self.diffusion_weight = float(config.diffusion.loss_weight)
        self.z_loss_weight = float(config.get("loss", {}).get("z_loss_weight", 0.0))
        self.image_token_offset = image_token_offset(config.model)

    def draw_noise(self, batch: dict, rng: jax.Array):
        """(noisy images, t, noise) for every image slot of the batch."""
        return diffusion.noise_images(rng, batch["images"], batch["image_t_max"], self.alpha_bar)

    def sums_given_noise(self, params, batch: dict, noisy, t, noise) -> dict:
        """Loss sums and counts with t and noise fixed (gradient accumulation draws them
        once for the global batch, then cuts microbatches)."""
        model = nnx.merge(self.graphdef, params)
        logits, eps = model(batch, noisy, t)
        return losses.transfusion_sums(logits, eps, noise, batch, self.z_loss_weight,
                                       self.image_token_offset)

    def sums(self, params, batch: dict, rng: jax.Array) -> dict:
        """Loss sums and counts of one batch; t and noise are drawn here."""
        return self.sums_given_noise(params, batch, *self.draw_noise(batch, rng))

    def loss(self, params, batch: dict, rng: jax.Array):
        """(scalar loss, aux) for jax.value_and_grad(has_aux=True)."""
        sums = self.sums(params, batch, rng)
        values = losses.combine(sums, self.diffusion_weight)
        return values["loss"], dict(sums=sums, **values)
