"""Pure training steps for the VAE and the VQ-VAE (used by launch/train_autoencoder.py).

One step = optax update of the autoencoder (and, once the adversarial term is on, of
the patch discriminator). Loss of the VAE: recon + kl_weight * KL (+ adv_weight *
generator hinge). Loss of the VQ-VAE: recon + codebook + commitment (+ adversarial).
Two jitted variants (with / without the adversarial term) are chosen in Python by
the step number, so steps before `adv_start_step` never run the discriminator.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tfusion.autoencoders import losses
from tfusion.autoencoders.autoencoder_kl import AutoencoderKL
from tfusion.autoencoders.discriminator import PatchDiscriminator
from tfusion.autoencoders.vq import codebook_usage


@dataclasses.dataclass(frozen=True)
class LossConfig:
    reconstruction: str = "l1"  # "l1" or "l2"
    kl_weight: float = 1e-6  # VAE only; see losses.kl_loss for the normalisation
    adv_weight: float = 0.0  # 0 = no discriminator at all
    adv_start_step: int = 0  # generator/discriminator adversarial terms start here


def _autoencoder_loss(model, images, key, loss_cfg: LossConfig):
    """(loss without the adversarial term, metrics, reconstruction)."""
    if isinstance(model, AutoencoderKL):
        post = model.posterior(images)
        recon = model.decode_z(post.sample(key))
        kl = losses.kl_loss(post, images[0].size)
        rec = losses.reconstruction_loss(recon, images, loss_cfg.reconstruction)
        return rec + loss_cfg.kl_weight * kl, {"loss_rec": rec, "loss_kl": kl}, recon
    recon, q = model(images)
    rec = losses.reconstruction_loss(recon, images, loss_cfg.reconstruction)
    metrics = {"loss_rec": rec, "loss_codebook": q.codebook_loss,
               "loss_commitment": q.commitment_loss,
               **codebook_usage(q.ids, model.cfg.num_vq_embeddings)}
    return rec + q.codebook_loss + q.commitment_loss, metrics, recon


class AutoencoderTrainer:
    """Holds params + optimizer states; `step(images, step)` returns metrics."""

    def __init__(self, model: nnx.Module, loss_cfg: LossConfig, learning_rate: float,
                 seed: int = 0, discriminator_channels: int = 32):
        self.loss_cfg = loss_cfg
        self.graphdef, self.params = nnx.split(model)
        self.optimizer = optax.adam(learning_rate, b1=0.5, b2=0.9)  # GAN-friendly betas
        self.opt_state = self.optimizer.init(self.params)
        self.disc_graphdef = self.disc_params = self.disc_opt_state = None
        if loss_cfg.adv_weight > 0:
            disc = PatchDiscriminator(discriminator_channels, rngs=nnx.Rngs(seed + 1))
            self.disc_graphdef, self.disc_params = nnx.split(disc)
            self.disc_opt_state = self.optimizer.init(self.disc_params)
        self.key = jax.random.key(seed)
        self._plain = jax.jit(self._plain_step, donate_argnums=(0, 1))
        self._adversarial = jax.jit(self._adversarial_step, donate_argnums=(0, 1, 2, 3))

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)

    def _plain_step(self, params, opt_state, images, key):
        def loss_fn(p):
            loss, metrics, recon = _autoencoder_loss(nnx.merge(self.graphdef, p), images, key,
                                                     self.loss_cfg)
            return loss, (metrics, recon)

        (loss, (metrics, recon)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        metrics = {**metrics, "loss": loss, "psnr": losses.psnr(recon, images),
                   "grad_norm": optax.global_norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    def _adversarial_step(self, params, opt_state, disc_params, disc_opt_state, images, key):
        def disc_logits(dp, x):
            return nnx.merge(self.disc_graphdef, dp)(x)

        def loss_fn(p):
            loss, metrics, recon = _autoencoder_loss(nnx.merge(self.graphdef, p), images, key,
                                                     self.loss_cfg)
            adv = losses.generator_adversarial_loss(disc_logits(disc_params, recon))
            return loss + self.loss_cfg.adv_weight * adv, (metrics, recon, adv)

        (loss, (metrics, recon, adv)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        fake = jax.lax.stop_gradient(recon)
        disc_loss, disc_grads = jax.value_and_grad(lambda dp: losses.hinge_discriminator_loss(
            disc_logits(dp, images), disc_logits(dp, fake)))(disc_params)
        disc_updates, disc_opt_state = self.optimizer.update(disc_grads, disc_opt_state,
                                                             disc_params)
        metrics = {**metrics, "loss": loss, "loss_adv": adv, "loss_disc": disc_loss,
                   "psnr": losses.psnr(recon, images), "grad_norm": optax.global_norm(grads)}
        return (optax.apply_updates(params, updates), opt_state,
                optax.apply_updates(disc_params, disc_updates), disc_opt_state, metrics)

    def step(self, images: Any, step: int) -> dict[str, float]:
        self.key, key = jax.random.split(self.key)
        images = jnp.asarray(images)
        if self.disc_params is not None and step >= self.loss_cfg.adv_start_step:
            (self.params, self.opt_state, self.disc_params, self.disc_opt_state,
             metrics) = self._adversarial(self.params, self.opt_state, self.disc_params,
                                          self.disc_opt_state, images, key)
        else:
            self.params, self.opt_state, metrics = self._plain(self.params, self.opt_state,
                                                               images, key)
        return {k: float(v) for k, v in metrics.items()}
