"""The paper's `unet` modality layers: U-Net down blocks in, up blocks out.

The paper says only "U-Net down blocks to encode, up blocks to decode, regular
LayerNorm instead of AdaLN, ~0.27B extra parameters". Our choices (ADM-like):

Encoder (noisy latent [N, H, W, C] -> patch embeddings [N, P, D]):
  conv3x3 C -> ch[0]; for each level l = 0..L-1 (L = log2(k) + 1):
  `unet_blocks_per_level` residual blocks to ch[l], then a stride-2 conv3x3
  (not after the last level), so the last level runs on the (H/k, W/k) patch
  grid. LayerNorm -> Dense ch[-1] -> D per grid cell, flattened row-major
  (patch p = row * grid_w + col, the order of `patchify`). Every residual block
  output is kept as a skip for the decoder.
Decoder (transformer output [N, P, D] -> epsilon [N, H, W, C] in float32):
  Dense D -> ch[-1] on the grid; levels in reverse, each with
  `unet_blocks_per_level` residual blocks whose input is the running activation
  concatenated with the matching encoder skip; between levels nearest-neighbour
  upsample x2 then conv3x3. Finally LayerNorm -> SiLU -> conv3x3 ch[0] -> C,
  zero-initialised so the untrained model predicts eps = 0 (MSE starts at 1).
Residual block (c_in -> c_out): LN -> SiLU -> conv3x3 -> + Dense(SiLU(temb))
  -> LN -> SiLU -> conv3x3, plus the input (through a 1x1 conv when c_in != c_out).
  LayerNorm is over channels, per pixel (the paper's "regular LayerNorm").
Timestep: sinusoidal features (timestep_embed_dim) -> 2-layer MLP to
  TEMB_MULT * ch[0] features (ADM's 4x), one MLP each in encoder and decoder.

Convolutions are NHWC with HWIO kernels; compute is in cfg.dtype, parameters in
float32. FLOPs: `unet_flops_per_image` counts every conv/dense as 2 * MACs over
the full kernel (what the hardware executes, as MFU conventions count it).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tfusion.config import ModelConfig
from tfusion.model.layers import (Conv, Dense, LayerNorm, TimestepMLP, grid_to_patches,
                                  patches_to_grid)

CONV_AXES = ("conv_h", "conv_w", "unet_in", "unet_out")
# The convolutions that read / write the latent: its C channels (8 at paper scale) are
# too few to shard, so they carry their own logical name (tfusion/sharding.py).
CONV_IN_AXES = ("conv_h", "conv_w", "unet_latent", "unet_out")
CONV_OUT_AXES = ("conv_h", "conv_w", "unet_in", "unet_latent")
TEMB_MULT = 4  # timestep-embedding width = TEMB_MULT * unet_channels[0] (ADM)


def num_levels(cfg) -> int:
    return int(math.log2(cfg.patch_size)) + 1


def temb_dim(cfg) -> int:
    return TEMB_MULT * cfg.unet_channels[0]


def encoder_blocks(cfg) -> list[tuple[int, int, int]]:
    """(level, c_in, c_out) of every encoder residual block, in call order."""
    plan, c = [], cfg.unet_channels[0]
    for level, ch in enumerate(cfg.unet_channels):
        for _ in range(cfg.unet_blocks_per_level):
            plan.append((level, c, ch))
            c = ch
    return plan


def decoder_blocks(cfg) -> list[tuple[int, int, int]]:
    """(level, c_in incl. the concatenated skip, c_out) of every decoder block."""
    plan, c = [], cfg.unet_channels[-1]
    for level in reversed(range(num_levels(cfg))):
        ch = cfg.unet_channels[level]
        for _ in range(cfg.unet_blocks_per_level):
            plan.append((level, c + ch, ch))  # encoder blocks of this level output ch
            c = ch
    return plan


def conv3x3(c_in: int, c_out: int, *, rngs: nnx.Rngs, stride: int = 1,
            std: float | None = None, dtype: str = "float32", axes=CONV_AXES) -> Conv:
    """3x3 'same' convolution with the U-Net's axis names."""
    return Conv(c_in, c_out, axes, rngs=rngs, stride=stride, std=std, dtype=dtype)


class ResBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, temb: int, *, rngs: nnx.Rngs, dtype: str):
        self.norm1 = LayerNorm(c_in, "unet_in", dtype=dtype)
        self.conv1 = conv3x3(c_in, c_out, rngs=rngs, dtype=dtype)
        self.temb_proj = Dense(temb, (c_out,), ("unet_in", "unet_out"), rngs=rngs,
                               use_bias=True, dtype=dtype)
        self.norm2 = LayerNorm(c_out, "unet_in", dtype=dtype)
        self.conv2 = conv3x3(c_out, c_out, rngs=rngs, dtype=dtype)
        self.shortcut = (Dense(c_in, (c_out,), ("unet_in", "unet_out"), rngs=rngs,
                               use_bias=True, dtype=dtype) if c_in != c_out else None)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """x [N, h, w, c_in], temb [N, E] (already SiLU'd) -> [N, h, w, c_out]."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.temb_proj(temb)[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        x = self.shortcut(x) if self.shortcut is not None else x.astype(h.dtype)
        return x + h


class UNetEncoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        chans, dt, temb = tuple(cfg.unet_channels), cfg.dtype, temb_dim(cfg)
        self.n_levels, self.per_level = num_levels(cfg), cfg.unet_blocks_per_level
        self.t_embed = TimestepMLP(cfg.timestep_embed_dim, temb, "unet_in", rngs=rngs, dtype=dt)
        self.conv_in = conv3x3(cfg.latent_channels, chans[0], rngs=rngs, dtype=dt,
                               axes=CONV_IN_AXES)
        self.blocks = nnx.List([ResBlock(ci, co, temb, rngs=rngs, dtype=dt)
                                for _, ci, co in encoder_blocks(cfg)])
        self.downs = nnx.List([conv3x3(ch, ch, stride=2, rngs=rngs, dtype=dt)
                               for ch in chans[:-1]])
        self.out_norm = LayerNorm(chans[-1], "unet_in", dtype=dt)
        self.proj = Dense(chans[-1], (cfg.width,), ("unet_in", "embed"), rngs=rngs,
                          use_bias=True, dtype=dt)

    def __call__(self, latents: jax.Array, t: jax.Array):
        """latents [N, H, W, C], t [N] -> (patch embeddings [N, P, D], skips)."""
        temb = jax.nn.silu(self.t_embed(t))
        x = self.conv_in(latents)
        skips = []
        for level in range(self.n_levels):
            for j in range(self.per_level):
                x = self.blocks[level * self.per_level + j](x, temb)
                skips.append(x)
            if level < self.n_levels - 1:
                x = self.downs[level](x)
        return grid_to_patches(self.proj(self.out_norm(x))), tuple(skips)


class UNetDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        chans, dt, temb = tuple(cfg.unet_channels), cfg.dtype, temb_dim(cfg)
        self.grid = (cfg.grid_h, cfg.grid_w)
        self.n_levels, self.per_level = num_levels(cfg), cfg.unet_blocks_per_level
        self.t_embed = TimestepMLP(cfg.timestep_embed_dim, temb, "unet_in", rngs=rngs, dtype=dt)
        self.proj = Dense(cfg.width, (chans[-1],), ("embed", "unet_out"), rngs=rngs,
                          use_bias=True, dtype=dt)
        self.blocks = nnx.List([ResBlock(ci, co, temb, rngs=rngs, dtype=dt)
                                for _, ci, co in decoder_blocks(cfg)])
        # ups[i] follows decoder level n_levels-1-i (levels run from coarse to fine).
        self.ups = nnx.List([conv3x3(ch, ch, rngs=rngs, dtype=dt) for ch in chans[:0:-1]])
        self.out_norm = LayerNorm(chans[0], "unet_in", dtype=dt)
        self.conv_out = conv3x3(chans[0], cfg.latent_channels, std=0.0, rngs=rngs, dtype=dt,
                                axes=CONV_OUT_AXES)

    def __call__(self, hidden: jax.Array, skips, t: jax.Array) -> jax.Array:
        """hidden [N, P, D], encoder skips, t [N] -> predicted epsilon [N, H, W, C] f32."""
        temb = jax.nn.silu(self.t_embed(t))
        x = patches_to_grid(self.proj(hidden), *self.grid)
        skips = list(skips)
        for i in range(self.n_levels):
            for j in range(self.per_level):
                x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
                x = self.blocks[i * self.per_level + j](x, temb)
            if i < self.n_levels - 1:
                x = self.ups[i](jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        eps = self.conv_out(jax.nn.silu(self.out_norm(x)))
        return eps.astype(jnp.float32)


def unet_flops_per_image(cfg) -> int:
    """Forward FLOPs (2 * MACs, full 3x3 kernels) of encoder + decoder for one image."""
    chans, c_lat, temb = cfg.unet_channels, cfg.latent_channels, temb_dim(cfg)
    n_levels = num_levels(cfg)

    def pixels(level):
        return (cfg.latent_height >> level) * (cfg.latent_width >> level)

    def conv(level, ci, co, size=3):
        return 2 * pixels(level) * size * size * ci * co

    def res_block(level, ci, co):
        shortcut = conv(level, ci, co, size=1) if ci != co else 0
        return conv(level, ci, co) + conv(level, co, co) + 2 * temb * co + shortcut

    t_mlp = 2 * (cfg.timestep_embed_dim * temb + temb * temb)
    width_proj = 2 * cfg.patches_per_image * chans[-1] * cfg.width
    encoder = (t_mlp + conv(0, c_lat, chans[0]) + width_proj
               + sum(res_block(*b) for b in encoder_blocks(cfg))
               + sum(conv(level + 1, chans[level], chans[level]) for level in range(n_levels - 1)))
    decoder = (t_mlp + width_proj + conv(0, chans[0], c_lat)
               + sum(res_block(*b) for b in decoder_blocks(cfg))
               + sum(conv(level - 1, chans[level], chans[level]) for level in range(1, n_levels)))
    return int(encoder + decoder)
