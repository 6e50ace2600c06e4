"""Per-block key ranges: which kv blocks a query block visits, and the reverse.

Block-sparse kernels tile the [Lq, Lk] score matrix into block_q x block_k
tiles. Each query row allows one contiguous key range (attention.key_ranges_from_info),
so a query block needs exactly the kv blocks overlapping the union of its rows'
ranges; every other tile is fully masked and skipped. The backward pass for
dk/dv walks the transpose: for each kv block, the query blocks that visit it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _ceil_div(a, b):
    return (a + b - 1) // b


def pad_ranges(k_start: jax.Array, k_end: jax.Array, block_q: int
               ) -> tuple[jax.Array, jax.Array]:
    """Pads [B, Lq] ranges to a multiple of block_q with empty ranges [0, 0)."""
    extra = -k_start.shape[1] % block_q
    pad = ((0, 0), (0, extra))
    return jnp.pad(k_start, pad), jnp.pad(k_end, pad)


def kv_blocks_per_q_block(k_start: jax.Array, k_end: jax.Array, block_q: int,
                          block_k: int) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) kv-block indices each query block visits: int32 [B, Lq / block_q].

    Empty rows (padding) do not widen the range; a block of only empty rows
    visits nothing (lo = hi = 0). Lq must be a multiple of block_q.
    """
    b, lq = k_start.shape
    nonempty = k_end > k_start
    lo = jnp.where(nonempty, k_start, jnp.iinfo(jnp.int32).max).reshape(b, -1, block_q)
    hi = jnp.where(nonempty, k_end, 0).reshape(b, -1, block_q)
    lo = lo.min(axis=-1) // block_k
    hi = _ceil_div(hi.max(axis=-1), block_k)
    any_row = nonempty.reshape(b, -1, block_q).any(axis=-1)
    return (jnp.where(any_row, lo, 0).astype(jnp.int32),
            jnp.where(any_row, hi, 0).astype(jnp.int32))


def q_blocks_per_kv_block(kv_lo: jax.Array, kv_hi: jax.Array, num_kv_blocks: int
                          ) -> tuple[jax.Array, jax.Array]:
    """[lo, hi) query-block indices that visit each kv block: int32 [B, num_kv_blocks].

    The visiting query blocks are contiguous because key ranges grow with the
    query index; a non-contiguous set would only add tiles that the in-tile mask
    zeroes, never drop one.
    """
    nq = kv_lo.shape[1]
    c = jnp.arange(num_kv_blocks, dtype=jnp.int32)[None, None, :]
    visits = (kv_lo[:, :, None] <= c) & (c < kv_hi[:, :, None])  # [B, nq, nk]
    r = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
    lo = jnp.where(visits, r, nq).min(axis=1)
    hi = jnp.where(visits, r + 1, 0).max(axis=1)
    any_q = visits.any(axis=1)
    return (jnp.where(any_q, lo, 0).astype(jnp.int32),
            jnp.where(any_q, hi, 0).astype(jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockRanges:
    """Both walks of the tile grid: kv_* are [B, nq] kv-block ranges per query
    block, q_* are [B, nk] query-block ranges per kv block (all [lo, hi))."""

    kv_lo: jax.Array
    kv_hi: jax.Array
    q_lo: jax.Array
    q_hi: jax.Array

    @classmethod
    def build(cls, k_start, k_end, block_q: int, block_k: int, num_kv_blocks: int
              ) -> "BlockRanges":
        kv_lo, kv_hi = kv_blocks_per_q_block(k_start, k_end, block_q, block_k)
        q_lo, q_hi = q_blocks_per_kv_block(kv_lo, kv_hi, num_kv_blocks)
        return cls(kv_lo, kv_hi, q_lo, q_hi)


def visited_fraction(k_start: jax.Array, k_end: jax.Array, lk: int, block_q: int,
                     block_k: int) -> jax.Array:
    """Fraction of the [Lq, Lk] tiles a kernel computes (1 - this = skipped)."""
    k_start, k_end = pad_ranges(k_start, k_end, block_q)
    lo, hi = kv_blocks_per_q_block(k_start, k_end, block_q, block_k)
    return (hi - lo).sum() / (lo.size * _ceil_div(lk, block_k))
