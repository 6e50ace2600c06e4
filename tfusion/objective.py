"""The training objective as a pure function of parameters (what jax.grad sees)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tfusion import diffusion, losses


class Objective:
    """Binds the static parts (graphdef, schedule, weights) of the Transfusion loss."""

    def __init__(self, graphdef: nnx.GraphDef, config):
        self.graphdef = graphdef
        self.alpha_bar = jnp.asarray(
            diffusion.alphas_cumprod(diffusion.make_betas(config.diffusion)), jnp.float32)
        self.diffusion_weight = float(config.diffusion.loss_weight)
        self.z_loss_weight = float(config.get("loss", {}).get("z_loss_weight", 0.0))

    def sums(self, params, batch: dict, rng: jax.Array) -> dict:
        """Loss sums and counts of one (micro)batch; t and noise are drawn here."""
        model = nnx.merge(self.graphdef, params)
        noisy, t, noise = diffusion.noise_images(rng, batch["images"], batch["image_t_max"],
                                                 self.alpha_bar)
        logits, eps = model(batch, noisy, t)
        return losses.transfusion_sums(logits, eps, noise, batch, self.z_loss_weight)

    def loss(self, params, batch: dict, rng: jax.Array):
        """(scalar loss, aux) for jax.value_and_grad(has_aux=True)."""
        sums = self.sums(params, batch, rng)
        values = losses.combine(sums, self.diffusion_weight)
        return values["loss"], dict(sums=sums, **values)
