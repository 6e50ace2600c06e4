"""Building blocks of the diffusers-style VAE encoder/decoder (NHWC, HWIO kernels).

Attribute names match diffusers' module names (norm1, conv1, conv_shortcut, to_q,
downsamplers, ...) so a diffusers state-dict key maps onto our parameter path by
renaming only the leaf (see diffusers_weights.py). Normalisation and softmax run in
float32 whatever the compute dtype, as diffusers upcasts them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tfusion.model.layers import Conv, Dense, dtype_of

# Autoencoders are small next to the backbone: their axes are replicated (sharding.py).
CONV_AXES = ("conv_h", "conv_w", "vae_in", "vae_out")
EPS = 1e-6  # diffusers' VAE eps for every GroupNorm


def vae_conv(c_in: int, c_out: int, *, rngs: nnx.Rngs, size: int = 3, stride: int = 1,
             padding=None, dtype: str = "float32") -> Conv:
    """size x size convolution with bias and the autoencoders' axis names; `padding` is
    ((top, bottom), (left, right)), default 'same'."""
    return Conv(c_in, c_out, CONV_AXES, rngs=rngs, size=size, stride=stride, padding=padding,
                dtype=dtype)


class GroupNorm(nnx.Module):
    def __init__(self, groups: int, channels: int, dtype: str = "float32"):
        self.scale = nnx.Param(jnp.ones((channels,)), logical_axes=("vae_out",))
        self.bias = nnx.Param(jnp.zeros((channels,)), logical_axes=("vae_out",))
        self.groups, self.dtype = groups, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
        mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + EPS)).reshape(n, h, w, c)
        return (y * self.scale[...] + self.bias[...]).astype(dtype_of(self.dtype))


class ResnetBlock(nnx.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a 1x1-projected skip."""

    def __init__(self, c_in: int, c_out: int, groups: int, *, rngs: nnx.Rngs, dtype: str):
        self.norm1 = GroupNorm(groups, c_in, dtype)
        self.conv1 = vae_conv(c_in, c_out, rngs=rngs, dtype=dtype)
        self.norm2 = GroupNorm(groups, c_out, dtype)
        self.conv2 = vae_conv(c_out, c_out, rngs=rngs, dtype=dtype)
        self.conv_shortcut = (vae_conv(c_in, c_out, size=1, rngs=rngs, dtype=dtype)
                              if c_in != c_out else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x.astype(h.dtype)
        return skip + h


class SpatialAttention(nnx.Module):
    """One-head self-attention over all pixels (diffusers' mid-block Attention)."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, dtype: str):
        def linear():
            return Dense(channels, (channels,), ("vae_in", "vae_out"), rngs=rngs,
                         use_bias=True, dtype=dtype)

        self.group_norm = GroupNorm(groups, channels, dtype)
        self.to_q, self.to_k, self.to_v, self.to_out = linear(), linear(), linear(), linear()

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(n, h * w, c)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        logits = jnp.einsum("nqc,nkc->nqk", q.astype(jnp.float32), k.astype(jnp.float32))
        weights = jax.nn.softmax(logits * c ** -0.5, axis=-1).astype(v.dtype)
        out = self.to_out(jnp.einsum("nqk,nkc->nqc", weights, v)).reshape(n, h, w, c)
        return out + x.astype(out.dtype)


class Downsample(nnx.Module):
    """Stride-2 conv3x3 after padding one row/column at the bottom/right (diffusers)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: str):
        self.conv = vae_conv(channels, channels, stride=2, padding=((0, 1), (0, 1)),
                           rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then conv3x3."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype: str):
        self.conv = vae_conv(channels, channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class MidBlock(nnx.Module):
    """resnet -> attention (optional) -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *,
                 rngs: nnx.Rngs, dtype: str):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs, dtype=dtype)
                                 for _ in range(2)])
        self.attentions = nnx.List(
            [SpatialAttention(channels, groups, rngs=rngs, dtype=dtype)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class ResolutionBlock(nnx.Module):
    """diffusers' DownEncoderBlock2D / UpDecoderBlock2D: resnets, then a resampler.

    `sampler` is "down", "up" or None; its list attribute (downsamplers/upsamplers)
    is named as in diffusers so weights map by name.
    """

    def __init__(self, c_in: int, c_out: int, num_resnets: int, groups: int,
                 sampler: str | None, *, rngs: nnx.Rngs, dtype: str):
        self.resnets = nnx.List([ResnetBlock(c_in if i == 0 else c_out, c_out, groups,
                                             rngs=rngs, dtype=dtype)
                                 for i in range(num_resnets)])
        self.downsamplers = nnx.List(
            [Downsample(c_out, rngs=rngs, dtype=dtype)] if sampler == "down" else [])
        self.upsamplers = nnx.List(
            [Upsample(c_out, rngs=rngs, dtype=dtype)] if sampler == "up" else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for resample in (*self.downsamplers, *self.upsamplers):
            x = resample(x)
        return x
