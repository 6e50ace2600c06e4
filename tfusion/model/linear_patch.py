"""The paper's `linear` modality layers: one linear in, one linear out.

Encoder: patchify the noisy latent, add an embedding of t to every patch vector,
project to the model width. Decoder: one linear from the model width back to a
patch of epsilon, then unpatchify.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tfusion.config import derived
from tfusion.model.layers import Dense, sinusoidal_embedding
from tfusion.model.patches import patchify, unpatchify


class TimestepMLP(nnx.Module):
    """Sinusoidal features of t -> 2-layer MLP -> `out_dim` vector."""

    def __init__(self, feature_dim: int, out_dim: int, out_axis: str | None, *,
                 rngs: nnx.Rngs, dtype: str):
        self.feature_dim = feature_dim
        self.fc1 = Dense(feature_dim, (out_dim,), ("timestep", out_axis), rngs=rngs,
                         use_bias=True, dtype=dtype)
        self.fc2 = Dense(out_dim, (out_dim,), (out_axis, out_axis), rngs=rngs,
                         use_bias=True, dtype=dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(sinusoidal_embedding(t, self.feature_dim))))


class LinearPatchEncoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d = derived(cfg)
        self.k = cfg.patch_size
        self.t_embed = TimestepMLP(cfg.timestep_embed_dim, d["patch_dim"], "patch",
                                   rngs=rngs, dtype=cfg.dtype)
        self.proj = Dense(d["patch_dim"], (cfg.width,), ("patch", "embed"), rngs=rngs,
                          use_bias=True, dtype=cfg.dtype)

    def __call__(self, latents: jax.Array, t: jax.Array):
        """latents [N, H, W, C], t [N] -> (patch embeddings [N, P, D], no skips)."""
        x = patchify(latents, self.k) + self.t_embed(t)[:, None, :]
        return self.proj(x), ()


class LinearPatchDecoder(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d = derived(cfg)
        self.k, self.h, self.w = cfg.patch_size, cfg.latent_height, cfg.latent_width
        # Zero init: the untrained model predicts eps = 0, the MSE starts at 1.
        self.proj = Dense(cfg.width, (d["patch_dim"],), ("embed", "patch"), rngs=rngs,
                          std=0.0, use_bias=True, dtype=cfg.dtype)

    def __call__(self, hidden: jax.Array, skips, t: jax.Array) -> jax.Array:
        """hidden [N, P, D] -> predicted epsilon [N, H, W, C] in float32."""
        del skips, t
        out = self.proj(hidden).astype(jnp.float32)
        return unpatchify(out, self.k, self.h, self.w)


def linear_flops_per_image(cfg) -> int:
    """Forward matmul FLOPs of the linear encoder + decoder for one image."""
    d = derived(cfg)
    return 2 * 2 * d["patches_per_image"] * d["patch_dim"] * cfg.width
