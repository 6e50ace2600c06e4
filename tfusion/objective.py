"""The training objective as a pure function of parameters (what jax.grad sees)."""
from __future__ import annotations

import jax
from flax import nnx

from tfusion import diffusion, losses
from tfusion.config import image_token_offset


class Objective:
    """Binds the static parts (graphdef, noise process, weights) of the Transfusion loss."""

    def __init__(self, graphdef: nnx.GraphDef, config):
        self.graphdef = graphdef
        self.process = diffusion.NoiseProcess(config.diffusion)
        self.diffusion_weight = float(config.diffusion.loss_weight)
        self.z_loss_weight = float(config.get("loss", {}).get("z_loss_weight", 0.0))
        self.image_token_offset = image_token_offset(config.model)

    def draw_noise(self, batch: dict, rng: jax.Array) -> diffusion.NoiseDraw:
        """Time, noise, noisy latents and targets for every image slot of the batch."""
        return self.process.draw(rng, batch["images"], batch["image_t_max"])

    def sums_given_noise(self, params, batch: dict, draw: diffusion.NoiseDraw) -> dict:
        """Loss sums and counts with the noise fixed (gradient accumulation draws it once
        for the global batch, then cuts microbatches)."""
        model = nnx.merge(self.graphdef, params)
        logits, image_pred = model(batch, draw.noisy, draw.model_t)
        return losses.transfusion_sums(logits, image_pred, draw.target, batch,
                                       self.z_loss_weight, self.image_token_offset,
                                       draw.weight)

    def sums(self, params, batch: dict, rng: jax.Array) -> dict:
        """Loss sums and counts of one batch; t and noise are drawn here."""
        return self.sums_given_noise(params, batch, self.draw_noise(batch, rng))

    def loss(self, params, batch: dict, rng: jax.Array):
        """(scalar loss, aux) for jax.value_and_grad(has_aux=True)."""
        sums = self.sums(params, batch, rng)
        values = losses.combine(sums, self.diffusion_weight)
        return values["loss"], dict(sums=sums, **values)
