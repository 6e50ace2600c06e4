"""The decoder stack: Llama-style blocks (RMSNorm pre-norm, attention with RoPE,
SwiGLU) whose parameters are stacked on a `layers` axis.

Parameters are always stacked, so a checkpoint does not depend on how the stack
runs: `scan_layers=True` runs it with lax.scan (compile time independent of depth),
False unrolls a Python loop over layer slices (faster steps on some backends).
Each block is rematerialised by the policy named in config.model.remat_policy.
With a KV cache (decoding), each block writes this call's keys and values at each
row's `cache_index` and attends over the whole cache.

Untied modality weights (model.modality_weights = "untied", Mixture-of-Transformers):
every projection and norm has an image twin (`image_qkv`, `image_gate_up`, ...) that
image positions use; attention stays one global attention in sequence order. To cost
no duplicate matmul, `ModalityRouting` lays each row group's positions into tiles of
`untied_tile` positions, text first, images from the next tile boundary, so every tile
holds one modality; a loop over tiles multiplies each by its modality's weights
(`tiled_dense`) and the results are put back in sequence order. That is the shared
step's FLOPs plus at most one tile per row group. A group is one batch shard (the
active mesh's data x fsdp), so the reordering stays on its device. Cached decoding
(a few positions per call) selects per position between both projections instead.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from tfusion import attention, config as config_lib, kernels
from tfusion.config import ModelConfig
from tfusion.model.layers import Dense, RMSNorm, apply_rope, dtype_of
from tfusion.sharding import active_sharding, constrain, logical_to_spec

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
class ModalityRouting:
    """Where each position's untied projections run (model.modality_weights="untied").

    is_image bool [B, L]. Tiled (training, full-sequence forwards): the B rows form G
    groups of consecutive rows, n = B / G * L positions each, laid into T tiles of
    `tile` positions: `source` int32 [G, T * tile] is the position each tile row reads
    (n = a zero row), `dest` int32 [G, n] the tile row each position's result is read
    back from, `tile_is_image` bool [G, T]. Untiled (source None: cached decoding),
    both projections run and each position takes its modality's.
    """

    is_image: jax.Array
    source: Optional[jax.Array] = None
    dest: Optional[jax.Array] = None
    tile_is_image: Optional[jax.Array] = None

    @property
    def tiled(self) -> bool:
        return self.source is not None


def batch_shards(rows: int) -> int:
    """How many shards the active mesh cuts `rows` rows into (1 outside a mesh)."""
    active = active_sharding()
    if active is None:
        return 1
    mesh, table = active
    axes = logical_to_spec(("activation_batch",), table)[0] or ()
    shards = 1
    for axis in (axes,) if isinstance(axes, str) else axes:
        shards *= mesh.shape[axis]
    return shards if rows % shards == 0 else 1


def route_by_modality(is_image: jax.Array, tile: int, tiled: bool = True) -> ModalityRouting:
    """The routing of is_image [B, L]; groups are the active mesh's batch shards."""
    if not tiled:
        return ModalityRouting(is_image)
    b, l = is_image.shape
    groups = batch_shards(b)
    n = b // groups * l
    n_tiles = -(-n // tile) + 1  # one more than n needs: the text/image boundary tile
    flat = is_image.reshape(groups, n)
    n_text = jnp.sum(~flat, axis=1, keepdims=True, dtype=jnp.int32)
    image_from = -(-n_text // tile) * tile  # images start on the tile after the text
    dest = jnp.where(flat, image_from + jnp.cumsum(flat, axis=1, dtype=jnp.int32) - 1,
                     jnp.cumsum(~flat, axis=1, dtype=jnp.int32) - 1)
    source = jax.vmap(lambda d: jnp.full((n_tiles * tile,), n, jnp.int32)
                      .at[d].set(jnp.arange(n, dtype=jnp.int32), unique_indices=True))(dest)
    tile_is_image = jnp.arange(n_tiles, dtype=jnp.int32)[None, :] * tile >= image_from
    return ModalityRouting(is_image, source, dest, tile_is_image)


def to_tiles(x: jax.Array, routing: ModalityRouting) -> jax.Array:
    """[B, L, ...] -> [T, G, tile, ...] in routing order (tile rows of no position: 0)."""
    g, n = routing.dest.shape
    n_tiles = routing.tile_is_image.shape[1]
    flat = x.reshape(g, n, *x.shape[2:])
    flat = jnp.concatenate([flat, jnp.zeros_like(flat[:, :1])], axis=1)
    idx = routing.source.reshape(g, -1, *([1] * (x.ndim - 2)))
    tiles = jnp.take_along_axis(flat, idx, axis=1)
    tiles = tiles.reshape(g, n_tiles, -1, *x.shape[2:]).swapaxes(0, 1)
    return constrain(tiles, (None, "activation_batch") + (None,) * (tiles.ndim - 2))


def from_tiles(tiles: jax.Array, routing: ModalityRouting, rows: int) -> jax.Array:
    """[T, G, tile, ...] -> [B, L, ...] in sequence order."""
    g, n = routing.dest.shape
    flat = tiles.swapaxes(0, 1).reshape(g, -1, *tiles.shape[3:])
    idx = routing.dest.reshape(g, n, *([1] * (tiles.ndim - 3)))
    out = jnp.take_along_axis(flat, idx, axis=1)
    return out.reshape(rows, n * g // rows, *tiles.shape[3:])


def tiled_dense(tiles: jax.Array, text: Dense, image: Dense, routing: ModalityRouting,
                unroll: bool) -> jax.Array:
    """Each tile of [T, G, tile, in] times its modality's kernel (and bias): a loop over
    tiles, each step one [G, tile, in] x [G, in, out] matmul with each group's kernel
    chosen by a select (no second matmul). unroll: an unrolled loop
    (model.untied_unroll), else lax.scan."""
    dt = dtype_of(text.dtype)
    k_text, k_image = text.kernel[...].astype(dt), image.kernel[...].astype(dt)
    out_shape = k_text.shape[1:]
    k_text, k_image = k_text.reshape(k_text.shape[0], -1), k_image.reshape(k_image.shape[0], -1)
    has_bias = text.bias is not None
    b_text = text.bias[...].astype(dt).reshape(-1) if has_bias else None
    b_image = image.bias[...].astype(dt).reshape(-1) if has_bias else None

    def one_tile(_, xs):
        x, is_image = xs  # [G, tile, in], [G]
        kernel = jnp.where(is_image[:, None, None], k_image, k_text)
        y = jnp.einsum("gti,gio->gto", x.astype(dt), kernel)
        if has_bias:
            y = y + jnp.where(is_image[:, None], b_image, b_text)[:, None, :]
        return None, y

    _, y = jax.lax.scan(one_tile, None, (tiles, routing.tile_is_image.T), unroll=unroll)
    return y.reshape(*y.shape[:3], *out_shape)


def modality_dense(text: Dense, image: Optional[Dense], x: jax.Array,
                   routing: Optional[ModalityRouting], unroll: bool) -> jax.Array:
    """text(x) for shared weights; otherwise each position through its modality's Dense."""
    if image is None:
        return text(x)
    if routing.tiled:
        return from_tiles(tiled_dense(to_tiles(x, routing), text, image, routing, unroll),
                          routing, x.shape[0])
    y_text, y_image = text(x), image(x)
    mask = routing.is_image.reshape(*routing.is_image.shape, *([1] * (y_text.ndim - 2)))
    return jnp.where(mask, y_image, y_text)


def modality_norm(text: RMSNorm, image: Optional[RMSNorm], x: jax.Array,
                  is_image: Optional[jax.Array]) -> jax.Array:
    """RMSNorm with each position's modality's scale (elementwise: no routing needed);
    is_image bool [B, L] (unused with shared weights)."""
    if image is None:
        return text(x)
    mask = is_image.reshape(*is_image.shape, *([1] * (x.ndim - 2)))
    return text(x, jnp.where(mask, image.scale[...], text.scale[...]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockContext:
    """Per-forward inputs every block shares (computed once, not per layer).

    `cache_index` (int32 [B]) is where each row's keys of this call are written in a
    KV cache (decoding); None in training, where keys are exactly this call's positions.
    `routing`: where untied modality weights run (None with shared weights).
    """

    sin: jax.Array
    cos: jax.Array
    mask: attention.MaskInfo
    cache_index: Optional[jax.Array] = None
    routing: Optional[ModalityRouting] = None


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
        self.unroll = cfg.untied_unroll
        untied = cfg.modality_weights == "untied"
        for prefix in ("", "image_") if untied else ("",):
            setattr(self, prefix + "qkv", Dense(
                cfg.width, (self.num_kv_heads, self.group + 2, self.head_dim),
                ("embed", "kv_heads", None, "head_dim"), rngs=rngs, std=cfg.init_std,
                use_bias=cfg.qkv_bias, dtype=cfg.dtype))
            setattr(self, prefix + "out", Dense(
                cfg.num_heads * self.head_dim, (cfg.width,), ("heads", "embed"), rngs=rngs,
                std=cfg.init_std / (2 * cfg.depth) ** 0.5, dtype=cfg.dtype))
            for name in ("q_norm", "k_norm"):
                setattr(self, prefix + name, RMSNorm(self.head_dim, "head_dim", cfg.norm_eps,
                                                     cfg.dtype) if cfg.qk_norm else None)
        if not untied:
            self.image_qkv = self.image_out = self.image_q_norm = self.image_k_norm = None

    def __call__(self, x, ctx: BlockContext, cache=None):
        b, l, _ = x.shape
        qkv = modality_dense(self.qkv, self.image_qkv, x, ctx.routing, self.unroll)
        q = qkv[:, :, :, :self.group].reshape(b, l, self.num_heads, self.head_dim)
        k, v = qkv[:, :, :, self.group], qkv[:, :, :, self.group + 1]  # [B, L, Hkv, Dh]
        if self.q_norm is not None:
            is_image = None if ctx.routing is None else ctx.routing.is_image
            q = modality_norm(self.q_norm, self.image_q_norm, q, is_image)
            k = modality_norm(self.k_norm, self.image_k_norm, k, is_image)
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
        return modality_dense(self.out, self.image_out, out, ctx.routing, self.unroll), cache


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        hidden = cfg.mlp_dim
        self.unroll = cfg.untied_unroll
        untied = cfg.modality_weights == "untied"
        for prefix in ("", "image_") if untied else ("",):
            setattr(self, prefix + "gate_up", Dense(
                cfg.width, (2, hidden), ("embed", None, "mlp"), rngs=rngs, std=cfg.init_std,
                dtype=cfg.dtype))
            setattr(self, prefix + "down", Dense(
                hidden, (cfg.width,), ("mlp", "embed"), rngs=rngs,
                std=cfg.init_std / (2 * cfg.depth) ** 0.5, dtype=cfg.dtype))
        if not untied:
            self.image_gate_up = self.image_down = None

    def __call__(self, x, routing: Optional[ModalityRouting] = None):
        if self.image_gate_up is not None and routing.tiled:
            # Both matmuls in tile order: one reordering in, one out.
            tiles = to_tiles(x, routing)
            gu = tiled_dense(tiles, self.gate_up, self.image_gate_up, routing, self.unroll)
            h = jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]
            y = tiled_dense(h, self.down, self.image_down, routing, self.unroll)
            return from_tiles(y, routing, x.shape[0])
        gu = modality_dense(self.gate_up, self.image_gate_up, x, routing, self.unroll)
        h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
        h = constrain(h, ("activation_batch", "activation_length", "activation_mlp"))
        return modality_dense(self.down, self.image_down, h, routing, self.unroll)


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        untied = cfg.modality_weights == "untied"
        for prefix in ("", "image_") if untied else ("",):
            for name in ("attn_norm", "mlp_norm"):
                setattr(self, prefix + name, RMSNorm(cfg.width, "embed", cfg.norm_eps, cfg.dtype))
        if not untied:
            self.image_attn_norm = self.image_mlp_norm = None
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x, ctx: BlockContext, cache=None):
        routing = ctx.routing
        is_image = None if routing is None else routing.is_image
        attn_out, cache = self.attn(modality_norm(self.attn_norm, self.image_attn_norm, x,
                                                  is_image), ctx, cache)
        x = x + attn_out
        x = x + self.mlp(modality_norm(self.mlp_norm, self.image_mlp_norm, x, is_image),
                         routing)
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
