"""The convolutional encoder and decoder shared by AutoencoderKL and the VQ-VAE.

Same layout as diffusers' `Encoder` / `Decoder` (vae.py): conv_in, one
ResolutionBlock per entry of block_out_channels (a stride-2 downsample after every
level but the last), mid block, GroupNorm -> SiLU -> conv_out. The decoder mirrors
it with one extra resnet per level and nearest upsampling.
"""
from __future__ import annotations

import jax
from flax import nnx

from tfusion.autoencoders.config import AutoencoderConfig
from tfusion.autoencoders.layers import vae_conv, GroupNorm, MidBlock, ResolutionBlock


class Encoder(nnx.Module):
    """images [N, H, W, in_channels] -> features [N, H/f, W/f, out_channels]."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int, *, rngs: nnx.Rngs,
                 dtype: str = "float32"):
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = vae_conv(cfg.in_channels, widths[0], rngs=rngs, dtype=dtype)
        blocks, c_in = [], widths[0]
        for level, width in enumerate(widths):
            last = level == len(widths) - 1
            blocks.append(ResolutionBlock(c_in, width, cfg.layers_per_block, groups,
                                          None if last else "down", rngs=rngs, dtype=dtype))
            c_in = width
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(widths[-1], groups, cfg.mid_block_add_attention,
                                  rngs=rngs, dtype=dtype)
        self.conv_norm_out = GroupNorm(groups, widths[-1], dtype)
        self.conv_out = vae_conv(widths[-1], out_channels, rngs=rngs, dtype=dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.conv_in(images)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """latents [N, h, w, latent_channels] -> images [N, h*f, w*f, out_channels]."""

    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs, dtype: str = "float32"):
        widths, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = vae_conv(cfg.latent_channels, widths[0], rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(widths[0], groups, cfg.mid_block_add_attention,
                                  rngs=rngs, dtype=dtype)
        blocks, c_in = [], widths[0]
        for level, width in enumerate(widths):
            last = level == len(widths) - 1
            blocks.append(ResolutionBlock(c_in, width, cfg.layers_per_block + 1, groups,
                                          None if last else "up", rngs=rngs, dtype=dtype))
            c_in = width
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(groups, widths[-1], dtype)
        self.conv_out = vae_conv(widths[-1], cfg.out_channels, rngs=rngs, dtype=dtype)

    def __call__(self, latents: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(latents))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
