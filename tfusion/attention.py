"""Transfusion attention: mask semantics and the dense XLA reference kernel.

Semantics (DESIGN.md): query i may attend key j iff both are in the same
document (segment id, 0 = padding attends nothing) and j <= i, or i and j are
patches of the same image (full attention inside an image).

`MaskInfo` carries the per-position ids for queries and keys separately, so the
same kernels serve training (q = k = the whole row) and cached decoding (q = the
new positions, k = the cache). Kernels receive q, k, v and a MaskInfo and never a
dense [L, L] mask unless they build one themselves (the XLA reference does).
The other kernels and the dispatcher by config name live in tfusion/kernels/.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def image_slot(image_index: jax.Array, patches_per_image: int) -> jax.Array:
    """Image slot of each position (-1 for text/pad); unique per image within a row."""
    return jnp.where(image_index >= 0, image_index // patches_per_image, -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskInfo:
    """Ids that define the mask; all int32, q_* are [B, Lq] and kv_* are [B, Lk].

    `*_index` is the position in the row's sequence (causality), `*_slot` the image
    slot (-1 for text, and for every position when images are attended causally).
    """

    q_segment_ids: jax.Array
    q_slot: jax.Array
    q_index: jax.Array
    kv_segment_ids: jax.Array
    kv_slot: jax.Array
    kv_index: jax.Array

    @classmethod
    def from_batch(cls, segment_ids, image_index, patches_per_image: int,
                   bidirectional_images: bool = True) -> "MaskInfo":
        slot = image_slot(image_index, patches_per_image)
        if not bidirectional_images:
            slot = jnp.full_like(slot, -1)
        index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32),
                                 segment_ids.shape)
        return cls(segment_ids, slot, index, segment_ids, slot, index)


def mask_from_info(info: MaskInfo) -> jax.Array:
    """bool [B, Lq, Lk] from MaskInfo."""
    same_doc = ((info.q_segment_ids[:, :, None] == info.kv_segment_ids[:, None, :])
                & (info.q_segment_ids[:, :, None] != 0))
    causal = info.kv_index[:, None, :] <= info.q_index[:, :, None]
    same_image = ((info.q_slot[:, :, None] == info.kv_slot[:, None, :])
                  & (info.q_slot[:, :, None] >= 0))
    return same_doc & (causal | same_image)


def attention_mask(segment_ids, image_index, patches_per_image: int) -> jax.Array:
    """The reference mask of DESIGN.md: bool [B, L, L] (allowed[b, i, j])."""
    info = MaskInfo.from_batch(jnp.asarray(segment_ids), jnp.asarray(image_index),
                               patches_per_image)
    return mask_from_info(info)


def key_ranges_from_info(info: MaskInfo) -> tuple[jax.Array, jax.Array]:
    """Per-query contiguous key range [k_start, k_end) of the mask (jnp, [B, Lq]).

    THE derivation of ranges (traceable; kernels and FLOPs both use it). Keys of
    query i are [doc_start(i), max(i, image_end(i)) + 1) because documents and
    images are contiguous. Assumes the key side is the row in sequence order
    (kv_index[j] == j, true for training and for a KV cache), so `q_index` indexes
    the key arrays, and that no column of another segment (padding included) sits
    inside a document: the range starts at the query's run of equal segment ids.
    The KV cache keeps that by giving every row its own write index
    (tfusion/inference/cache.py). Padding queries get the empty range [i, i).
    """
    seg, slot = info.kv_segment_ids, info.kv_slot
    lk = seg.shape[1]
    pos = jnp.broadcast_to(jnp.arange(lk, dtype=jnp.int32), seg.shape)
    edge = jnp.ones_like(seg[:, :1], dtype=bool)
    doc_begins = jnp.concatenate([edge, seg[:, 1:] != seg[:, :-1]], axis=1)
    doc_start = jax.lax.cummax(jnp.where(doc_begins, pos, 0), axis=1)
    # Last index of each run of equal slots; only read where the query is a patch.
    run_ends = jnp.concatenate([slot[:, 1:] != slot[:, :-1], edge], axis=1)
    run_end = jax.lax.cummin(jnp.where(run_ends, pos, lk), axis=1, reverse=True)
    qi = info.q_index.astype(jnp.int32)
    at_q = jnp.clip(qi, 0, lk - 1)
    k_start = jnp.take_along_axis(doc_start, at_q, axis=1)
    image_end = jnp.take_along_axis(run_end, at_q, axis=1)
    k_end = jnp.where(info.q_slot >= 0, jnp.maximum(qi, image_end), qi) + 1
    valid = info.q_segment_ids != 0
    return jnp.where(valid, k_start, qi), jnp.where(valid, k_end, qi)


def key_ranges(segment_ids: np.ndarray, image_index: np.ndarray, patches_per_image: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """numpy [B, L] key ranges of a training batch (FLOPs, block-sparsity stats).

    The same ranges as `key_ranges_from_info` (q = k = the row), in numpy on purpose:
    the trainer's input-feed thread counts FLOPs with it, and a helper thread that
    dispatches JAX work starves a device's participant in the train step's
    collectives (XLA:CPU aborts the run). Tests hold the two derivations equal.
    """
    seg = np.asarray(segment_ids, np.int32)
    idx = np.asarray(image_index, np.int32)
    b, l = seg.shape
    pos = np.broadcast_to(np.arange(l, dtype=np.int32), (b, l))
    slot = np.where(idx >= 0, idx // patches_per_image, -1)
    edge = np.ones((b, 1), bool)
    doc_begins = np.concatenate([edge, seg[:, 1:] != seg[:, :-1]], axis=1)
    doc_start = np.maximum.accumulate(np.where(doc_begins, pos, 0), axis=1)
    run_ends = np.concatenate([slot[:, 1:] != slot[:, :-1], edge], axis=1)
    # Last index of each run of equal slots: a reversed running minimum.
    run_end = np.minimum.accumulate(np.where(run_ends, pos, l)[:, ::-1], axis=1)[:, ::-1]
    k_end = np.where(slot >= 0, np.maximum(pos, run_end), pos) + 1
    valid = seg != 0
    return np.where(valid, doc_start, pos), np.where(valid, k_end, pos)


# Masked logits: exp(masked - row max) underflows to exactly 0, and a row with no
# allowed key (padding) stays finite and averages its values uniformly.
_MASKED_LOGIT = -1e30


def xla_attention(q, k, v, info: MaskInfo, *, scale: float | None = None) -> jax.Array:
    """Dense masked attention in plain XLA: the reference and the CPU default.

    q [B, Lq, H, Dh]; k, v [B, Lk, Hkv, Dh] with H a multiple of Hkv (GQA: query
    head h uses kv head h // (H / Hkv)). Returns [B, Lq, H, Dh] in q's dtype.
    Fully masked (padding) queries get a uniform average, never NaN.

    Head-major operands and a hand-written backward (below) rather than autodiff
    through softmax: on XLA:CPU 1.25-1.66x faster forward + backward than the previous
    form and the README job's train step 1.28x (benchmarks/results/attention_xla.json).
    """
    b, lq, h, dh = q.shape
    _, lk, hkv, _ = k.shape
    groups = h // hkv
    scale = dh ** -0.5 if scale is None else scale
    # Query head h uses kv head h // groups; the groups' queries all see the same keys,
    # so they stack along the query axis: [B, Hkv, groups * Lq, Dh] (4-D einsums run
    # ~1.5x faster on XLA:CPU than with a separate group axis).
    q_heads = (q.reshape(b, lq, hkv, groups, dh).transpose(0, 2, 3, 1, 4)
               .reshape(b, hkv, groups * lq, dh))
    k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lk, Dh]
    allowed = jnp.broadcast_to(mask_from_info(info)[:, None, None], (b, 1, groups, lq, lk))
    out = _softmax_attention(q_heads, k_heads, v_heads,
                             allowed.reshape(b, 1, groups * lq, lk), scale)
    out = out.reshape(b, hkv, groups, lq, dh).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, lq, h, dh).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q, k, v, allowed, scale):
    """softmax(q k^T * scale, over allowed keys) v, head-major (see xla_attention).

    Undifferentiated (decoding, evaluation) the weights are normalised after the value
    product, on [Lq, Dh] instead of [Lq, Lk]: one pass over the weights fewer. The
    forward rule below keeps the normalised weights, which the backward needs."""
    unnormalised, total = _unnormalised_weights(q, k, allowed, scale)
    out = jnp.einsum("bhqk,bhkd->bhqd", unnormalised.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out / total


def _unnormalised_weights(q, k, allowed, scale):
    """exp(masked logits - row max) [B, H, Lq, Lk] and its row sums [B, H, Lq, 1]."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(allowed, logits * scale, _MASKED_LOGIT)
    unnormalised = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    return unnormalised, unnormalised.sum(axis=-1, keepdims=True)


def _softmax_attention_fwd(q, k, v, allowed, scale):
    unnormalised, total = _unnormalised_weights(q, k, allowed, scale)
    probs = unnormalised / total
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out, (q, k, v, allowed, probs, out)


def _softmax_attention_bwd(scale, residuals, d_out):
    """With P = softmax(S), O = P V: dV = P^T dO, dP = dO V^T and, per query row,
    dS = P * (dP - sum_k P dP) where sum_k P dP = sum_d dO * O; dQ = dS K * scale,
    dK = dS^T Q * scale: four matmuls and one elementwise pass over [Lq, Lk], where
    autodiff through exp, max and the division makes several."""
    q, k, v, allowed, probs, out = residuals
    d_out = d_out.astype(jnp.float32)
    d_v = jnp.einsum("bhqk,bhqd->bhkd", probs, d_out)
    d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    # Masked logits are constants: a padding query's uniform row passes no gradient.
    d_logits = jnp.where(allowed, probs * (d_probs - (d_out * out).sum(-1, keepdims=True)), 0)
    d_logits = d_logits * scale
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q, preferred_element_type=jnp.float32)
    return (d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
