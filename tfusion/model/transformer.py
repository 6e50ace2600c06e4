"""The decoder stack: Llama-style blocks (RMSNorm pre-norm, attention with RoPE,
SwiGLU) whose parameters are stacked on a `layers` axis.

Parameters are always stacked, so a checkpoint does not depend on how the stack
runs: `scan_layers=True` runs it with lax.scan (compile time independent of depth),
False unrolls a Python loop over layer slices (faster steps on some backends).
Each block is rematerialised by the policy named in config.model.remat_policy.
With a KV cache (decoding), each block writes this call's keys and values at each
row's `cache_index` and attends over the whole cache.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from tfusion import attention, config as config_lib, kernels
from tfusion.config import ModelConfig
from tfusion.model.layers import Dense, RMSNorm, apply_rope
from tfusion.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}
assert tuple(REMAT_POLICIES) == config_lib.REMAT_POLICIES, "config.REMAT_POLICIES is stale"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockContext:
    """Per-forward inputs every block shares (computed once, not per layer).

    `cache_index` (int32 [B]) is where each row's keys of this call are written in a
    KV cache (decoding); None in training, where keys are exactly this call's positions.
    """

    sin: jax.Array
    cos: jax.Array
    mask: attention.MaskInfo
    cache_index: Optional[jax.Array] = None


def write_columns(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """cache [B, Hkv, S, Dh] with new [B, L, Hkv, Dh] written at columns
    index[b] .. index[b] + L - 1 of row b (index int32 [B]). A per-row scatter (batched,
    so it stays shard-local and in place); columns past S are dropped, never clamped
    onto earlier ones."""
    def row(c, n, i):
        cols = i + jax.numpy.arange(n.shape[0], dtype=jax.numpy.int32)
        return c.at[:, cols].set(n.swapaxes(0, 1).astype(c.dtype), mode="drop")
    return jax.vmap(row)(cache, new, index)


class SelfAttention(nnx.Module):
    """Fused QKV projection laid out per kv head: [embed, kv_heads, G + 2, head_dim].

    Each kv head's group holds its G = H / Hkv query heads, then k, then v, so one
    matmul serves MHA and GQA alike and sharding kv_heads over `tensor` keeps each
    group's q, k and v on the same device.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.group = cfg.num_heads // self.num_kv_heads
        self.kernel_name = cfg.attention_kernel
        self.qkv = Dense(cfg.width, (self.num_kv_heads, self.group + 2, self.head_dim),
                         ("embed", "kv_heads", None, "head_dim"), rngs=rngs,
                         std=cfg.init_std, use_bias=cfg.qkv_bias, dtype=cfg.dtype)
        self.out = Dense(cfg.num_heads * self.head_dim, (cfg.width,), ("heads", "embed"),
                         rngs=rngs, std=cfg.init_std / (2 * cfg.depth) ** 0.5, dtype=cfg.dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, "head_dim", cfg.norm_eps, cfg.dtype)
            self.k_norm = RMSNorm(self.head_dim, "head_dim", cfg.norm_eps, cfg.dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, ctx: BlockContext, cache=None):
        b, l, _ = x.shape
        qkv = self.qkv(x)  # [B, L, Hkv, G + 2, Dh]
        q = qkv[:, :, :, :self.group].reshape(b, l, self.num_heads, self.head_dim)
        k, v = qkv[:, :, :, self.group], qkv[:, :, :, self.group + 1]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, ctx.sin, ctx.cos), apply_rope(k, ctx.sin, ctx.cos)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        if cache is not None:  # head-major [B, Hkv, S, Dh]: write this call's columns
            cache = {name: write_columns(cache[name], new, ctx.cache_index)
                     for name, new in (("k", k), ("v", v))}
            # The kernels take [B, S, Hkv, Dh]; the XLA kernel works head-major, and its
            # transpose cancels this one, so the cache is read where it lies.
            k, v = (cache[name].transpose(0, 2, 1, 3).astype(q.dtype) for name in ("k", "v"))
        out = kernels.dot_product_attention(q, k, v, ctx.mask, kernel=self.kernel_name)
        # Named so the "save_attention_out" remat policy keeps it instead of recomputing.
        out = checkpoint_name(out, "attention_out")
        out = out.reshape(b, l, self.num_heads * self.head_dim)
        return self.out(out), cache


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hidden = cfg.mlp_dim
        self.gate_up = Dense(cfg.width, (2, hidden), ("embed", None, "mlp"), rngs=rngs,
                             std=cfg.init_std, dtype=cfg.dtype)
        self.down = Dense(hidden, (cfg.width,), ("mlp", "embed"), rngs=rngs,
                          std=cfg.init_std / (2 * cfg.depth) ** 0.5, dtype=cfg.dtype)

    def __call__(self, x):
        gu = self.gate_up(x)
        h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return self.down(h)


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.width, "embed", cfg.norm_eps, cfg.dtype)
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.width, "embed", cfg.norm_eps, cfg.dtype)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x, ctx: BlockContext, cache=None):
        attn_out, cache = self.attn(self.attn_norm(x), ctx, cache)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.depth = cfg.depth
        self.scan_layers = cfg.scan_layers
        self.remat_policy = cfg.remat_policy

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(rngs):
            return DecoderBlock(cfg, rngs=rngs)

        self.blocks = stacked(rngs)
        for _, var in nnx.iter_graph(self.blocks):
            if isinstance(var, nnx.Param):
                var.set_metadata("logical_axes", ("layers",) + var.get_metadata()["logical_axes"])

    def __call__(self, x: jax.Array, ctx: BlockContext, cache=None):
        """x [B, L, D] -> ([B, L, D], updated cache or None).

        `cache`, when given, is {"k", "v"} stacked over layers: [depth, B, Hkv, S, Dh].
        """
        graphdef, params = nnx.split(self.blocks)

        def layer(x, layer_params, layer_cache):
            block = nnx.merge(graphdef, layer_params)
            return block(x, ctx, layer_cache)

        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not self.scan_layers)

        if self.scan_layers:
            def body(x, xs):
                layer_params, layer_cache = xs
                return layer(x, layer_params, layer_cache)

            return jax.lax.scan(body, x, (params, cache))
        new_cache = []
        for i in range(self.depth):
            sl = jax.tree.map(lambda a: a[i], (params, cache))
            x, c = layer(x, *sl)
            new_cache.append(c)
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *a: jax.numpy.stack(a), *new_cache)
