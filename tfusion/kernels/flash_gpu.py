"""Block-sparse flash attention for GPU (Pallas Triton), driven by key ranges.

One program per (batch, head, query block) loops with lax.fori_loop over exactly
the kv blocks [lo, hi) its queries may see, so skipped tiles cost nothing; dk/dv
programs (one per kv block and kv head) loop over the query blocks that visit
them and over the kv head's G query heads, accumulating GQA groups in registers.
Same layouts and tile math as flash_tpu.py, minus the TPU lane broadcast.
Triton needs power-of-two block sizes (and >= 16 for its dots).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

import tfusion.kernels.flash_math as fm
from tfusion.kernels.block_ranges import BlockRanges


def _triton(interpret):
    # Explicit Triton params: jax 0.10 otherwise lowers GPU pallas_calls with Mosaic GPU.
    return dict(interpret=interpret,
                compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2))


def _cols(block_index, block_k):
    return block_index * block_k + jnp.arange(block_k, dtype=jnp.int32)[None, :]


def _column(ref, *index):
    """A per-query vector as a [rows, 1] column (one indexer: Triton takes no chains)."""
    return ref[index if index else ...][:, None]


def _fwd_kernel(q_ref, k_ref, v_ref, ks_ref, ke_ref, lo_ref, hi_ref, o_ref, lse_ref, *,
                scale, block_k):
    i = pl.program_id(2)
    q, ks, ke = q_ref[...], _column(ks_ref), _column(ke_ref)

    def body(c, carry):
        kv = pl.ds(c * block_k, block_k)
        mask = fm.tile_mask(ks, ke, _cols(c, block_k))
        s = fm.scores(q, k_ref[kv, :], scale)
        return fm.online_softmax_step(s, mask, v_ref[kv, :], *carry)

    init = (jnp.full(ks.shape, fm.MASK_VALUE, jnp.float32),
            jnp.zeros(ks.shape, jnp.float32), jnp.zeros(q.shape, jnp.float32))
    out, lse = fm.finalize(*jax.lax.fori_loop(lo_ref[i], hi_ref[i], body, init))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ks_ref, ke_ref, lo_ref,
               hi_ref, dq_ref, *, scale, block_k):
    i = pl.program_id(2)
    q, do, ks, ke = q_ref[...], do_ref[...], _column(ks_ref), _column(ke_ref)
    lse, delta = _column(lse_ref), _column(delta_ref)

    def body(c, dq):
        kv = pl.ds(c * block_k, block_k)
        k = k_ref[kv, :]
        mask = fm.tile_mask(ks, ke, _cols(c, block_k))
        _, ds = fm.backward_tile(fm.scores(q, k, scale), mask, lse, delta, do, v_ref[kv, :])
        return dq + fm.matmul(ds.astype(k.dtype), k) * scale

    dq = jax.lax.fori_loop(lo_ref[i], hi_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ks_ref, ke_ref, lo_ref,
                hi_ref, dk_ref, dv_ref, *, scale, block_q, block_k, group):
    c = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    cols = _cols(c, block_k)

    def body(r, acc, g):
        rows = pl.ds(r * block_q, block_q)
        q, do = q_ref[g, rows, :], do_ref[g, rows, :]
        mask = fm.tile_mask(_column(ks_ref, rows), _column(ke_ref, rows), cols)
        p, ds = fm.backward_tile(fm.scores(q, k, scale), mask, _column(lse_ref, g, rows),
                                 _column(delta_ref, g, rows), do, v)
        dk, dv = acc
        return (dk + fm.matmul(ds.astype(q.dtype).T, q) * scale,
                dv + fm.matmul(p.astype(do.dtype).T, do))

    acc = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for g in range(group):  # static: G is small and known at trace time
        acc = jax.lax.fori_loop(lo_ref[c], hi_ref[c], functools.partial(_flip, body, g), acc)
    dk_ref[...] = acc[0].astype(dk_ref.dtype)
    dv_ref[...] = acc[1].astype(dv_ref.dtype)


def _flip(body, g, r, acc):
    return body(r, acc, g)


def forward(q, k, v, k_start, k_end, r: BlockRanges, *, scale, block_q, block_k,
            interpret):
    """(out [B, H, Lq, D], lse [B, H, Lq] float32)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group, nq = h // hkv, lq // block_q
    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((None, None, lk, d), lambda bi, hi, i: (bi, hi // group, 0, 0))
    row_spec = pl.BlockSpec((None, block_q), lambda bi, hi, i: (bi, i))
    blocks_spec = pl.BlockSpec((None, nq), lambda bi, hi, i: (bi, 0))
    lse_spec = pl.BlockSpec((None, None, block_q), lambda bi, hi, i: (bi, hi, i))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, block_k=block_k),
        grid=(b, h, nq),
        in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec, blocks_spec, blocks_spec],
        out_specs=[q_spec, lse_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
        **_triton(interpret), name="transfusion_flash_fwd",
    )(q, k, v, k_start, k_end, r.kv_lo, r.kv_hi)


def backward(q, k, v, k_start, k_end, r: BlockRanges, lse, do, delta, *, scale, block_q,
             block_k, interpret):
    """(dq, dk, dv) in the input layouts; lse and delta are [B, H, Lq] float32."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group, nq, nk = h // hkv, lq // block_q, lk // block_k
    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((None, None, lk, d), lambda bi, hi, i: (bi, hi // group, 0, 0))
    vec_spec = pl.BlockSpec((None, None, block_q), lambda bi, hi, i: (bi, hi, i))
    row_spec = pl.BlockSpec((None, block_q), lambda bi, hi, i: (bi, i))
    blocks_spec = pl.BlockSpec((None, nq), lambda bi, hi, i: (bi, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k),
        grid=(b, h, nq),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec, row_spec, row_spec,
                  blocks_spec, blocks_spec],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        **_triton(interpret), name="transfusion_flash_dq",
    )(q, k, v, do, lse, delta, k_start, k_end, r.kv_lo, r.kv_hi)

    def grouped(x):  # [B, H, ...] -> [B, Hkv, G, ...]
        return x.reshape((b, hkv, group) + x.shape[2:])

    gq_spec = pl.BlockSpec((None, None, group, lq, d), lambda bi, hk, c: (bi, hk, 0, 0, 0))
    gvec_spec = pl.BlockSpec((None, None, group, lq), lambda bi, hk, c: (bi, hk, 0, 0))
    k_spec = pl.BlockSpec((None, None, block_k, d), lambda bi, hk, c: (bi, hk, c, 0))
    full_row = pl.BlockSpec((None, lq), lambda bi, hk, c: (bi, 0))
    q_blocks_spec = pl.BlockSpec((None, nk), lambda bi, hk, c: (bi, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=block_q, block_k=block_k,
                          group=group),
        grid=(b, hkv, nk),
        in_specs=[gq_spec, k_spec, k_spec, gq_spec, gvec_spec, gvec_spec, full_row, full_row,
                  q_blocks_spec, q_blocks_spec],
        out_specs=[k_spec, k_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        **_triton(interpret), name="transfusion_flash_dkv",
    )(grouped(q), k, v, grouped(do), grouped(lse), grouped(delta), k_start, k_end,
      r.q_lo, r.q_hi)
    return dq, dk, dv
