"""Small building blocks whose parameters carry logical axis names.

Every parameter is an `nnx.Param` with a `logical_axes` metadata tuple; the one
rule table in tfusion/sharding.py maps those names to mesh axes. We keep our own
metadata key (instead of Flax's eager sharding) so modules can be built outside a
mesh, e.g. under `nnx.eval_shape` for parameter counting.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
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

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in float32 whatever the compute dtype: bf16 variance underflows.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(dtype_of(self.dtype))


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


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Standard transformer/DDPM sinusoidal features of integer timesteps: [..., dim]."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
