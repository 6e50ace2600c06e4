"""The decoding KV cache and the one function that runs new positions against it.

Layout: k, v stacked over layers and head-major, [depth, B, Hkv, S, Dh] (the
stack is what `Transformer` scans over; head-major is the operand layout of the
dense attention's einsums, so a decoding step reads the cache without transposing
it), plus per-slot mask ids: `segment_ids` [B, S] (0 = empty, left padding or a
dummy write, never attended) and `slot` [B, S] (image id at patches, else -1).
All rows share one write index, so every call writes the same cache columns in
every row; a row with nothing to add writes segment id 0 there instead. That keeps
shapes static across rows that are doing different things (text vs. image).

An image's id is the cache index of its first patch: unique within a row and the
same in every row, so prompt images and generated images never collide.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tfusion import attention
from tfusion.config import ModelConfig
from tfusion.sharding import constrain

KV_AXES = ("layers", "activation_batch", "activation_kv_heads", "activation_length", None)
ID_AXES = ("activation_batch", "activation_length")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [depth, B, Hkv, S, Dh]
    v: jax.Array
    segment_ids: jax.Array  # int32 [B, S]
    slot: jax.Array  # int32 [B, S]
    index: jax.Array  # int32 []: next column to write, shared by all rows

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]

    def advance(self, n: int) -> "KVCache":
        return dataclasses.replace(self, index=self.index + n)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    """An empty cache in the model's compute dtype (call inside jit to shard it)."""
    shape = (cfg.depth, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
    kv = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    ids = jnp.zeros((batch_size, max_len), jnp.int32)
    return constrain_cache(KVCache(kv, kv, ids, ids - 1, jnp.zeros((), jnp.int32)))


def constrain_cache(cache: KVCache) -> KVCache:
    """Batch over the data axes, kv heads over `tensor`, as in training."""
    return KVCache(constrain(cache.k, KV_AXES), constrain(cache.v, KV_AXES),
                   constrain(cache.segment_ids, ID_AXES), constrain(cache.slot, ID_AXES),
                   cache.index)


def extend(model, cache: KVCache, x, positions, segment_ids, slot):
    """Runs L new positions at cache.index through the backbone.

    x [B, L, D] input embeddings; positions (RoPE), segment_ids (0 = dummy) and
    slot (image id or -1) are int32 [B, L]. Returns (final-normed hidden [B, L, D],
    cache holding the new k/v and ids, index NOT advanced: the caller commits with
    `advance` or calls again at the same columns, as diffusion steps do).
    """
    b, l = segment_ids.shape
    if model.cfg.image_attention != "bidirectional":
        slot = jnp.full_like(slot, -1)  # the causal-image ablation: no image blocks
    at = (0, cache.index)
    kv_segment_ids = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, at)
    kv_slot = jax.lax.dynamic_update_slice(cache.slot, slot, at)
    q_index = cache.index + jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    kv_index = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
    mask = attention.MaskInfo(segment_ids, slot, q_index, kv_segment_ids, kv_slot, kv_index)
    ctx = model.context(positions, mask, cache_index=cache.index)
    hidden, kv = model.backbone(x, ctx, {"k": cache.k, "v": cache.v})
    new = KVCache(kv["k"], kv["v"], kv_segment_ids, kv_slot, cache.index)
    return model.final_norm(hidden), constrain_cache(new)
