"""Block-sparse flash attention for TPU (Pallas/Mosaic), driven by key ranges.

The grid walks, for each query block, kv-block steps j = 0..nk-1 and computes
only steps with lo + j < hi, where [lo, hi) are the kv blocks the query block
may see (block_ranges.py), read from SMEM through scalar prefetch. Skipped steps
map to the same kv block as the last computed one, so Pallas issues no DMA for
them; their cost is a grid-step overhead, not a tile of work.

Layout: q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (heads-major so a block's minor dims
are (rows, D)); per-query vectors (k_start, k_end, lse, delta) travel broadcast
over LANES lanes, the TPU's native [rows, 128] layout (as splash attention does),
and are sliced to one lane in XLA so only [B, H, Lq] is kept as a residual.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import tfusion.kernels.flash_math as fm
from tfusion.kernels.block_ranges import BlockRanges

LANES = 128


def _lanes(x):
    """[..., L] -> [..., L, LANES]: a per-query vector in TPU row layout."""
    return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


def _visit(lo_ref, hi_ref, row, step):
    """(computed?, block index) of grid step `step` over the range [lo, hi) of `row`."""
    lo, hi = lo_ref[row], hi_ref[row]
    return lo + step < hi, jnp.minimum(lo + step, jnp.maximum(hi - 1, 0))


def _cols(block_index, block_k):
    return block_index * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)


def _params(interpret, semantics):
    return dict(interpret=interpret,
                compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def _fwd_kernel(kv_lo, kv_hi, q_ref, k_ref, v_ref, ks_ref, ke_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, scale, block_k, nq):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    compute, c = _visit(kv_lo, kv_hi, b * nq + i, j)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, fm.MASK_VALUE)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(compute)
    def _tile():
        mask = fm.tile_mask(ks_ref[:, :1], ke_ref[:, :1], _cols(c, block_k))
        s = fm.scores(q_ref[...], k_ref[...], scale)
        m, l, acc = fm.online_softmax_step(s, mask, v_ref[...], m_sc[...], l_sc[...],
                                           acc_sc[...])
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        out, lse = fm.finalize(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _query_walk_specs(group: int, nq: int, block_q: int, block_k: int, d: int):
    """Block specs of the query-block-major walk (grid b, h, i, j) shared by the forward
    and dq kernels: (q-like [B,H,Lq,D], kv [B,Hkv,Lk,D] at the visited block, per-row
    [B,Lq,LANES], per-head-row [B,H,Lq,LANES])."""

    def kv_map(bi, hi, i, j, lo_ref, hi_ref):
        return bi, hi // group, _visit(lo_ref, hi_ref, bi * nq + i, j)[1], 0

    q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, d), kv_map)
    row_spec = pl.BlockSpec((None, block_q, LANES), lambda bi, hi, i, j, *_: (bi, i, 0))
    head_row_spec = pl.BlockSpec((None, None, block_q, LANES),
                                 lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    return q_spec, kv_spec, row_spec, head_row_spec


def forward(q, k, v, k_start, k_end, r: BlockRanges, *, scale, block_q, block_k,
            interpret):
    """(out [B, H, Lq, D], lse [B, H, Lq] float32)."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group, nq, nk = h // hkv, lq // block_q, lk // block_k

    q_spec, kv_spec, row_spec, lse_spec = _query_walk_specs(group, nq, block_q, block_k, d)
    kernel = functools.partial(_fwd_kernel, scale=scale, block_k=block_k, nq=nq)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, h, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, row_spec, row_spec],
            out_specs=[q_spec, lse_spec],
            scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                            pltpu.VMEM((block_q, 1), jnp.float32),
                            pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, lq, LANES), jnp.float32)],
        name="transfusion_flash_fwd",
        **_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
    )(r.kv_lo.reshape(-1), r.kv_hi.reshape(-1), q, k, v, _lanes(k_start), _lanes(k_end))
    return out, lse[..., 0]


def _dq_kernel(kv_lo, kv_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ks_ref,
               ke_ref, dq_ref, dq_sc, *, scale, block_k, nq):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    compute, c = _visit(kv_lo, kv_hi, b * nq + i, j)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(compute)
    def _tile():
        k = k_ref[...]
        mask = fm.tile_mask(ks_ref[:, :1], ke_ref[:, :1], _cols(c, block_k))
        s = fm.scores(q_ref[...], k, scale)
        _, ds = fm.backward_tile(s, mask, lse_ref[:, :1], delta_ref[:, :1], do_ref[...],
                                 v_ref[...])
        dq_sc[...] += fm.matmul(ds.astype(k.dtype), k) * scale

    @pl.when(j == pl.num_programs(3) - 1)
    def _write():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(q_lo, q_hi, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ks_ref,
                ke_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, block_k, nk):
    b, c, g, r = (pl.program_id(n) for n in (0, 2, 3, 4))
    compute, _ = _visit(q_lo, q_hi, b * nk + c, r)
    first = (g == 0) & (r == 0)
    last = (g == pl.num_programs(3) - 1) & (r == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(compute)
    def _tile():
        q, do = q_ref[...], do_ref[...]
        mask = fm.tile_mask(ks_ref[:, :1], ke_ref[:, :1], _cols(c, block_k))
        s = fm.scores(q, k_ref[...], scale)
        p, ds = fm.backward_tile(s, mask, lse_ref[:, :1], delta_ref[:, :1], do, v_ref[...])
        dv_sc[...] += fm.matmul(p.astype(do.dtype).T, do)
        dk_sc[...] += fm.matmul(ds.astype(q.dtype).T, q) * scale

    @pl.when(last)
    def _write():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, k_start, k_end, r: BlockRanges, lse, do, delta, *, scale, block_q,
             block_k, interpret):
    """(dq, dk, dv) in the input layouts; lse and delta are [B, H, Lq] float32."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group, nq, nk = h // hkv, lq // block_q, lk // block_k
    starts, ends = _lanes(k_start), _lanes(k_end)
    lse, delta = _lanes(lse), _lanes(delta)

    # dq: the forward's walk (query block outer, its kv blocks inner).
    q_spec, kv_spec, row_spec, vec_spec = _query_walk_specs(group, nq, block_q, block_k, d)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k, nq=nq),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, h, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec, row_spec,
                      row_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="transfusion_flash_dq",
        **_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
    )(r.kv_lo.reshape(-1), r.kv_hi.reshape(-1), q, k, v, do, lse, delta, starts, ends)

    # dk, dv: kv block outer; the G query heads of its kv head and the query blocks
    # that visit it inner, so GQA groups accumulate in VMEM without a reduction.
    def grouped(x):  # [B, H, ...] -> [B, Hkv, G, ...]
        return x.reshape((b, hkv, group) + x.shape[2:])

    def q_map(bi, hk, c, g, rr, lo_ref, hi_ref):
        return bi, hk, g, _visit(lo_ref, hi_ref, bi * nk + c, rr)[1], 0

    def row_map(bi, hk, c, g, rr, lo_ref, hi_ref):
        return bi, _visit(lo_ref, hi_ref, bi * nk + c, rr)[1], 0

    gq_spec = pl.BlockSpec((None, None, None, block_q, d), q_map)
    gvec_spec = pl.BlockSpec((None, None, None, block_q, LANES), q_map)
    k_spec = pl.BlockSpec((None, None, block_k, d), lambda bi, hk, c, g, rr, *_: (bi, hk, c, 0))
    grow_spec = pl.BlockSpec((None, block_q, LANES), row_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_k=block_k, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, hkv, nk, group, nq),
            in_specs=[gq_spec, k_spec, k_spec, gq_spec, gvec_spec, gvec_spec, grow_spec,
                      grow_spec],
            out_specs=[k_spec, k_spec],
            scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32),
                            pltpu.VMEM((block_k, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="transfusion_flash_dkv",
        **_params(interpret, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
    )(r.q_lo.reshape(-1), r.q_hi.reshape(-1), grouped(q), k, v, grouped(do), grouped(lse),
      grouped(delta), starts, ends)
    return dq, dk, dv
