"""Tile math shared by every flash kernel (TPU Pallas, GPU Pallas/Triton).

The kernels differ only in how they walk tiles (a TPU grid axis with scalar
prefetch vs. a GPU fori_loop) and how they load them; the arithmetic on one
[block_q, block_k] tile lives here so both paths compute exactly the same thing.

Conventions: per-query values (k_start, k_end, m, l, lse, delta) are [bq, 1]
columns; scores are float32; masked scores are dropped by an explicit
`where(mask, p, 0)`, so a row that has seen no allowed key yet keeps l = 0 and
acc = 0 no matter what the running max holds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Finite so that `s - m` never computes inf - inf; far below any real logit.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# lse of a query with no allowed key: exp(s - EMPTY_LSE) underflows to 0.
EMPTY_LSE = -MASK_VALUE

_NT = (((1,), (1,)), ((), ()))  # a @ b.T without materialising the transpose


def matmul(a, b, *, transpose_b: bool = False):
    """float32-accumulated matmul of two tiles in their storage dtype."""
    if transpose_b:
        return jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)
    return jax.lax.dot(a, b, preferred_element_type=jnp.float32)


def tile_mask(k_start, k_end, cols):
    """bool [bq, bk]: key column `cols` [1, bk] lies in each row's [k_start, k_end)."""
    return (cols >= k_start) & (cols < k_end)


def scores(q, k, scale: float):
    return matmul(q, k, transpose_b=True) * scale


def online_softmax_step(s, mask, v, m_prev, l_prev, acc_prev):
    """Folds one tile into the running (max, normaliser, unnormalised output)."""
    s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
    correction = jnp.exp(m_prev - m_next)
    l_next = correction * l_prev + p.sum(axis=1, keepdims=True)
    acc_next = correction * acc_prev + matmul(p.astype(v.dtype), v)
    return m_next, l_next, acc_next


def finalize(m, l, acc):
    """(output, lse); a query with no allowed key (padding) outputs exactly 0."""
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    out = jnp.where(seen, acc / safe_l, 0.0)
    lse = jnp.where(seen, m + jnp.log(safe_l), EMPTY_LSE)
    return out, lse


def backward_tile(s, mask, lse, delta, do, v):
    """(p, ds) of one tile: p = softmax probs, ds = dL/d(scaled scores)."""
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)
    dp = matmul(do, v, transpose_b=True)
    return p, p * (dp - delta)
