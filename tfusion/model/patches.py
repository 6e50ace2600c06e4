"""Latent <-> patch-sequence conversion (row-major k x k patches)."""
from __future__ import annotations

import jax


def patchify(latents: jax.Array, k: int) -> jax.Array:
    """[N, H, W, C] -> [N, (H/k)*(W/k), k*k*C], patches in row-major grid order."""
    n, h, w, c = latents.shape
    x = latents.reshape(n, h // k, k, w // k, k, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // k) * (w // k), k * k * c)


def unpatchify(patches: jax.Array, k: int, h: int, w: int) -> jax.Array:
    """Inverse of `patchify`: [N, P, k*k*C] -> [N, H, W, C]."""
    n, _, d = patches.shape
    c = d // (k * k)
    x = patches.reshape(n, h // k, w // k, k, k, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h, w, c)


def grid_to_patches(x: jax.Array) -> jax.Array:
    """[N, gh, gw, D] feature map -> [N, gh*gw, D] (row-major, same order as patchify)."""
    n, gh, gw, d = x.shape
    return x.reshape(n, gh * gw, d)


def patches_to_grid(x: jax.Array, gh: int, gw: int) -> jax.Array:
    n, _, d = x.shape
    return x.reshape(n, gh, gw, d)
