"""The model's building blocks; every parameter carries logical axis names.

Norms, Dense, Conv (shared with the autoencoders), RoPE, patchify, timestep features.
Every parameter is an `nnx.Param` with a `logical_axes` metadata tuple; the one rule
table in tfusion/sharding.py maps those names to mesh axes. We keep our own metadata
key (instead of Flax's eager sharding) so modules can be built outside a mesh, e.g.
under `nnx.eval_shape` for parameter counting.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def dtype_of(name: str):
    return jnp.dtype(name)


def make_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None],
               std: float | None, dtype="float32") -> nnx.Param:
    """A truncated-normal (std) or zeros (std=None) parameter with logical axes."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    if std is None:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


def ones_param(shape: Sequence[int], axes: Sequence[str | None], dtype="float32") -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=tuple(axes))


class Dense(nnx.Module):
    """y = x @ W (+ b) over the last axis; W may have several output axes."""

    def __init__(self, in_features: int, out_shape: Sequence[int], axes: Sequence[str | None],
                 *, rngs: nnx.Rngs, std: float | None = None, use_bias: bool = False,
                 dtype: str = "float32"):
        out_shape = tuple(out_shape)
        std = (in_features ** -0.5) if std is None else std
        self.kernel = make_param(rngs, (in_features, *out_shape), axes, std)
        self.bias = make_param(rngs, out_shape, axes[1:], None) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = dtype_of(self.dtype)
        k = self.kernel[...].astype(dt)
        y = jnp.tensordot(x.astype(dt), k, axes=((x.ndim - 1,), (0,)))
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, features: int, axis_name: str | None, eps: float, dtype: str = "float32"):
        self.scale = ones_param((features,), (axis_name,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
        """scale: used instead of self.scale (untied modality norms pick one per position)."""
        # Statistics in float32 whatever the compute dtype: bf16 variance underflows.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (self.scale[...] if scale is None else scale)).astype(dtype_of(self.dtype))


class LayerNorm(nnx.Module):
    """Plain LayerNorm (the paper's U-Net uses it instead of AdaLN)."""

    def __init__(self, features: int, axis_name: str | None, eps: float = 1e-6,
                 dtype: str = "float32"):
        self.scale = ones_param((features,), (axis_name,))
        self.bias = nnx.Param(jnp.zeros((features,)), logical_axes=(axis_name,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(dtype_of(self.dtype))


class Conv(nnx.Module):
    """size x size convolution (NHWC, HWIO kernel) with bias, computed in `dtype`.

    padding ((top, bottom), (left, right)); default 'same' (size // 2 each side; with
    stride 2 and even H, W that gives exactly H/2, W/2). `axes` names the kernel's
    four axes for sharding (the U-Net and the autoencoders use their own names)."""

    def __init__(self, c_in: int, c_out: int, axes: Sequence[str | None], *,
                 rngs: nnx.Rngs, size: int = 3, stride: int = 1, padding=None,
                 std: float | None = None, dtype: str = "float32"):
        std = (size * size * c_in) ** -0.5 if std is None else std
        self.kernel = make_param(rngs, (size, size, c_in, c_out), axes, std)
        self.bias = make_param(rngs, (c_out,), (axes[-1],), None)
        pad = size // 2
        self.padding = ((pad, pad), (pad, pad)) if padding is None else tuple(
            tuple(p) for p in padding)
        self.stride, self.dtype = stride, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = dtype_of(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(dt), self.kernel[...].astype(dt), (self.stride, self.stride),
            self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(dt)


# --- positions: rotary embeddings (rotate-half layout), positions per document ---

def rope_inv_freq(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_positions: int = 8192) -> np.ndarray:
    """The head_dim // 2 rotation frequencies theta^(-i / half), float32, with the
    checkpoint's scaling: "linear" divides all by factor; "llama3" divides those whose
    wavelength exceeds original_max_positions / low_freq_factor, keeps those below
    original_max_positions / high_freq_factor, and interpolates in between."""
    half = head_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) / half)
    if scaling == "linear":
        inv_freq = inv_freq / factor
    elif scaling == "llama3":
        wavelength = 2 * np.pi / inv_freq
        ramp = (original_max_positions / wavelength - low_freq_factor) / (
            high_freq_factor - low_freq_factor)
        blended = (1 - ramp) * inv_freq / factor + ramp * inv_freq
        inv_freq = np.where(wavelength > original_max_positions / low_freq_factor,
                            inv_freq / factor,
                            np.where(wavelength < original_max_positions / high_freq_factor,
                                     inv_freq, blended))
    elif scaling != "none":
        raise ValueError(f"unknown rope scaling {scaling!r}")
    return inv_freq.astype(np.float32)


def rope_angles(positions: jax.Array, head_dim: int, theta: float, inv_freq=None):
    """positions [B, L] -> (sin, cos) each [B, L, 1, head_dim // 2], float32;
    inv_freq: rope_inv_freq's frequencies (default: unscaled)."""
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """x [B, L, H, Dh]: rotate the pairs (x[i], x[i + Dh/2]) by the position angle."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# --- latents <-> patch sequences (row-major k x k patches) ---

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


# --- diffusion time features ---

def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Standard transformer/DDPM sinusoidal features of integer timesteps: [..., dim]."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


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
