"""U-Net modality layers: shapes, patch order, zero-init decoder, FLOPs (the parameter
count at paper scale is checked in test_param_counts.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfusion.config import ModelConfig, model_config
from tfusion.model.unet import UNetDecoder, UNetEncoder, unet_flops_per_image


def tiny_cfg(patch_size=2, height=8, width_px=8, **overrides):
    c = model_config()
    c.modality_layer = "unet"
    c.width, c.num_heads = 64, 4
    c.latent_height, c.latent_width, c.latent_channels = height, width_px, 4
    c.patch_size = patch_size
    levels = int(math.log2(patch_size)) + 1
    c.unet_channels = (32, 64, 64)[:levels]  # few distinct shapes: fast init
    c.unet_blocks_per_level = 1
    c.timestep_embed_dim = 32
    c.update(overrides)
    return ModelConfig.of(c)


@nnx.jit
def encode_decode(enc, dec, latents, t):
    emb, skips = enc(latents, t)
    return emb, skips, dec(emb, skips, t)


@pytest.mark.parametrize("k, blocks", [(1, 1), pytest.param(2, 2, marks=pytest.mark.slow), (4, 1)])
def test_shapes(k, blocks):
    cfg = tiny_cfg(patch_size=k, height=8, width_px=16, unet_blocks_per_level=blocks)
    enc, dec = UNetEncoder(cfg, rngs=nnx.Rngs(0)), UNetDecoder(cfg, rngs=nnx.Rngs(1))
    latents = jax.random.normal(jax.random.key(0), (3, 8, 16, 4))
    t = jnp.array([0, 10, 999], jnp.int32)
    emb, skips, eps = encode_decode(enc, dec, latents, t)
    assert emb.shape == (3, cfg.patches_per_image, cfg.width)
    assert len(skips) == len(cfg.unet_channels) * cfg.unet_blocks_per_level
    assert eps.shape == latents.shape and eps.dtype == jnp.float32


def test_bfloat16_compute_returns_float32():
    cfg = tiny_cfg(dtype="bfloat16")
    enc, dec = UNetEncoder(cfg, rngs=nnx.Rngs(0)), UNetDecoder(cfg, rngs=nnx.Rngs(1))
    emb, _, eps = encode_decode(enc, dec, jnp.ones((2, 8, 8, 4)), jnp.array([1, 2]))
    assert emb.dtype == jnp.bfloat16 and eps.dtype == jnp.float32


def test_patch_order_matches_patchify():
    # A pixel in the bottom-left corner may only move nearby grid cells; the largest
    # change must land at its own patch p = row * grid_w + col (row-major).
    cfg = tiny_cfg(patch_size=2, height=32, width_px=32)
    enc = UNetEncoder(cfg, rngs=nnx.Rngs(0))
    latents = jax.random.normal(jax.random.key(1), (1, 32, 32, 4))
    t = jnp.array([500])
    bumped = latents.at[0, 31, 0, :].add(5.0)
    encode = nnx.jit(lambda m, x: m(x, t)[0])
    change = jnp.abs(encode(enc, bumped)[0] - encode(enc, latents)[0]).max(-1)  # [P]
    row, col = 31 // 2, 0
    assert int(jnp.argmax(change)) == row * cfg.grid_w + col
    grid = np.asarray(change).reshape(cfg.grid_h, cfg.grid_w)
    assert np.all(grid[:8] == 0) and np.all(grid[:, 8:] == 0)  # outside receptive field


def test_decoder_zero_at_init():
    cfg = tiny_cfg()
    enc, dec = UNetEncoder(cfg, rngs=nnx.Rngs(0)), UNetDecoder(cfg, rngs=nnx.Rngs(1))
    t = jnp.array([3, 700])
    emb, skips, eps = encode_decode(enc, dec, jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), t)
    np.testing.assert_array_equal(eps, 0.0)
    hidden = jax.random.normal(jax.random.key(2), emb.shape)
    np.testing.assert_array_equal(nnx.jit(lambda m: m(hidden, skips, t))(dec), 0.0)


def test_decoder_gets_gradient_at_init():
    # Zero final conv must not block learning: its kernel gets a nonzero gradient.
    cfg = tiny_cfg()
    enc, dec = UNetEncoder(cfg, rngs=nnx.Rngs(0)), UNetDecoder(cfg, rngs=nnx.Rngs(1))
    latents, t = jax.random.normal(jax.random.key(0), (2, 8, 8, 4)), jnp.array([3, 700])
    emb, skips, _ = encode_decode(enc, dec, latents, t)

    def loss(model):
        return jnp.mean((model(emb, skips, t) - latents) ** 2)

    grads = nnx.jit(nnx.grad(loss))(dec)
    assert float(jnp.abs(grads.conv_out.kernel[...]).max()) > 0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_flops_match_cost_analysis(k):
    # XLA counts only in-bounds conv taps and adds elementwise ops; with a 32x32
    # latent the two effects stay within 10% of our full-kernel matmul count.
    cfg = tiny_cfg(patch_size=k, height=32, width_px=32)
    enc, dec = UNetEncoder(cfg, rngs=nnx.Rngs(0)), UNetDecoder(cfg, rngs=nnx.Rngs(1))
    graph_e, state_e = nnx.split(enc)
    graph_d, state_d = nnx.split(dec)

    def forward(se, sd, latents, t):
        emb, skips = nnx.merge(graph_e, se)(latents, t)
        return nnx.merge(graph_d, sd)(emb, skips, t)

    compiled = jax.jit(forward).lower(state_e, state_d, jnp.zeros((1, 32, 32, 4)),
                                      jnp.zeros((1,), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    ours = unet_flops_per_image(cfg)
    assert abs(xla_flops - ours) / ours < 0.10, (xla_flops, ours)
