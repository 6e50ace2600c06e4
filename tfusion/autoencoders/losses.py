"""Autoencoder training losses and the PSNR metric. Images are in [-1, 1].

KL is summed over latent elements and divided by the number of pixel values per
image, i.e. on the same per-value scale as the mean reconstruction loss; with that
normalisation kl_weight has the meaning of LDM's (1e-6 for its f8 VAEs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tfusion.autoencoders.autoencoder_kl import Posterior


def reconstruction_loss(recon: jax.Array, target: jax.Array, kind: str) -> jax.Array:
    diff = recon.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    raise ValueError(f"unknown reconstruction loss {kind!r}; choose 'l1' or 'l2'")


def kl_loss(post: Posterior, pixel_values_per_image: int) -> jax.Array:
    """KL(q(z|x) || N(0, I)), per image, divided by pixel values per image; batch mean."""
    kl = 0.5 * (jnp.square(post.mean) + jnp.exp(post.logvar) - 1.0 - post.logvar)
    per_image = jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)
    return jnp.mean(per_image) / pixel_values_per_image


def psnr(recon: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over images of PSNR in dB, with both images mapped to [0, 1] (recon clipped)."""
    recon01 = (jnp.clip(recon, -1.0, 1.0) + 1.0) / 2.0
    target01 = (target + 1.0) / 2.0
    mse = jnp.mean(jnp.square(recon01 - target01).reshape(recon.shape[0], -1), axis=-1)
    return jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)))


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def generator_adversarial_loss(fake_logits: jax.Array) -> jax.Array:
    return -jnp.mean(fake_logits)
