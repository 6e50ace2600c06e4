"""The decoding KV cache and the one function that runs new positions against it.

Layout: k, v stacked over layers and head-major, [depth, B, Hkv, S, Dh] (the
stack is what `Transformer` scans over; head-major is the operand layout of the
dense attention's einsums, so a decoding step reads the cache without transposing
it), plus per-slot mask ids: `segment_ids` [B, S] (0 = empty or dead, never
attended) and `slot` [B, S] (image id at patches, else -1).

Every row has its own write index (its frontier): columns [0, index) hold the row's
sequence with no gaps, so each document's keys are contiguous, which is what the
flash kernels' one key range per query needs (attention.key_ranges_from_info).
A call writes L columns in every row (static shapes), each at the row's own
index. A row with nothing to add in that call writes them with segment id 0
("dead" columns) and is not advanced: they lie beyond its frontier, no query's
range reaches them, and the row's next real write overwrites them. Only a block's
leading live columns count: `commit` advances each row past its columns with a
non-zero segment id, so a block is live columns first, dead ones after (a
right-padded prompt).

An image's id is the cache column of its first patch: unique within a row.
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
    index: jax.Array  # int32 [B]: each row's next column to write (its frontier)

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]

    def commit(self, segment_ids: jax.Array) -> "KVCache":
        """Advances each row past the live (segment id != 0) columns of the block
        `segment_ids` [B, L] that the last `extend` wrote."""
        live = (segment_ids != 0).sum(axis=1).astype(jnp.int32)
        return dataclasses.replace(self, index=self.index + live)

    def first_rows(self, n: int) -> "KVCache":
        """The cache of rows [0, n) (a copy inside jit: steps outside the guidance
        interval run the conditional half of a CFG cache, steps.diffusion_steps)."""
        return KVCache(self.k[:, :n], self.v[:, :n], self.segment_ids[:n], self.slot[:n],
                       self.index[:n])


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    """An empty cache in the model's compute dtype (call inside jit to shard it)."""
    shape = (cfg.depth, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
    kv = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    ids = jnp.zeros((batch_size, max_len), jnp.int32)
    return constrain_cache(KVCache(kv, kv, ids, ids - 1, jnp.zeros((batch_size,), jnp.int32)))


def constrain_cache(cache: KVCache) -> KVCache:
    """Batch over the data axes, kv heads over `tensor`, as in training."""
    return KVCache(constrain(cache.k, KV_AXES), constrain(cache.v, KV_AXES),
                   constrain(cache.segment_ids, ID_AXES), constrain(cache.slot, ID_AXES),
                   constrain(cache.index, ID_AXES[:1]))


def _write_ids(ids: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """ids [B, S] with new [B, L] at columns index[b] + l (past S: dropped)."""
    def row(c, n, i):
        return c.at[i + jnp.arange(n.shape[0], dtype=jnp.int32)].set(n, mode="drop")
    return jax.vmap(row)(ids, new, index)


def extend(model, cache: KVCache, x, positions, segment_ids, slot):
    """Runs L new positions at each row's cache.index through the backbone.

    x [B, L, D] input embeddings; positions (RoPE), segment_ids (0 = dead) and
    slot (image id or -1) are int32 [B, L]. Returns (final-normed hidden [B, L, D],
    cache holding the new k/v and ids, index NOT advanced: the caller commits with
    `commit` or calls again at the same columns, as diffusion steps do).

    The key side is the whole cache in column order (kv_index[j] == j), which
    attention.key_ranges_from_info assumes; queries are at index[b] + arange(L).
    """
    b, l = segment_ids.shape
    is_image = slot >= 0  # untied modality weights: these positions use the image twins
    if model.cfg.image_attention != "bidirectional":
        slot = jnp.full_like(slot, -1)  # the causal-image ablation: no image blocks
    kv_segment_ids = _write_ids(cache.segment_ids, segment_ids, cache.index)
    kv_slot = _write_ids(cache.slot, slot, cache.index)
    q_index = cache.index[:, None] + jnp.arange(l, dtype=jnp.int32)[None, :]
    kv_index = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), (b, cache.max_len))
    mask = attention.MaskInfo(segment_ids, slot, q_index, kv_segment_ids, kv_slot, kv_index)
    ctx = model.context(positions, mask, cache_index=cache.index, is_image=is_image)
    hidden, kv = model.backbone(x, ctx, {"k": cache.k, "v": cache.v})
    new = KVCache(kv["k"], kv["v"], kv_segment_ids, kv_slot, cache.index)
    return model.norm_final(hidden, is_image), constrain_cache(new)
