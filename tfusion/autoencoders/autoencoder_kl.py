"""AutoencoderKL: the VAE whose latents Transfusion diffuses.

Pixels are NHWC in [-1, 1]. The encoder predicts a diagonal Gaussian (mean, logvar
with logvar clipped to [-30, 20] as diffusers does). Model-facing latents are
`(z - shift_factor) * scaling_factor`; `decode` inverts that first.
`jit_encode` / `jit_decode` give batched, jitted functions of plain arrays.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tfusion.autoencoders.config import AutoencoderConfig
from tfusion.autoencoders.encoder_decoder import Decoder, Encoder
from tfusion.autoencoders.layers import vae_conv

LOGVAR_RANGE = (-30.0, 20.0)


class Posterior(NamedTuple):
    mean: jax.Array  # [N, h, w, C], unscaled z
    logvar: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(
            key, self.mean.shape, self.mean.dtype)


def scale_latents(z: jax.Array, cfg: AutoencoderConfig) -> jax.Array:
    return (z - cfg.shift) * cfg.scaling_factor


def unscale_latents(latents: jax.Array, cfg: AutoencoderConfig) -> jax.Array:
    return latents / cfg.scaling_factor + cfg.shift


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs, dtype: str = "float32"):
        self.cfg = cfg
        moments = 2 * cfg.latent_channels
        self.encoder = Encoder(cfg, moments, rngs=rngs, dtype=dtype)
        self.quant_conv = (vae_conv(moments, moments, size=1, rngs=rngs, dtype=dtype)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (vae_conv(cfg.latent_channels, cfg.latent_channels, size=1,
                                       rngs=rngs, dtype=dtype)
                                if cfg.use_post_quant_conv else None)
        self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype)

    def posterior(self, images: jax.Array) -> Posterior:
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    def decode_z(self, z: jax.Array) -> jax.Array:
        """Unscaled z -> images (float32)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def encode(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Images -> scaled latents: the posterior mean, or a sample when `key` is given."""
        post = self.posterior(images)
        z = post.mean if key is None else post.sample(key)
        return scale_latents(z, self.cfg)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents -> images in (about) [-1, 1]."""
        return self.decode_z(unscale_latents(latents, self.cfg))


def jit_method(model: nnx.Module, method: str) -> Callable:
    """`fn(*arrays)` = model.method(*arrays), jitted over the model's state.

    The state is closed over as a jit argument (not a constant) so compiling does
    not bake the weights into the executable.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

    return lambda *args: run(state, *args)


def jit_encode(model: AutoencoderKL) -> Callable:
    """`fn(images [N, H, W, 3][, key])` -> scaled latents [N, h, w, C] (mean, or a sample
    when a PRNG key is passed)."""
    return jit_method(model, "encode")


def jit_decode(model: AutoencoderKL) -> Callable:
    """`fn(scaled latents)` -> images [N, H, W, 3]."""
    return jit_method(model, "decode")
