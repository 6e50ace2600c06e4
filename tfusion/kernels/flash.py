"""Range-driven flash attention: the kernel-independent driver and its custom VJP.

`flash_attention(q, k, v, info, ...)` has the signature of attention.xla_attention
(q [B, Lq, H, Dh], k/v [B, Lk, Hkv, Dh]). It derives per-query key ranges from
MaskInfo (attention.key_ranges_from_info), pads the sequences to block
multiples (padding queries get empty ranges, padding keys are never in a
range), moves heads in front, and calls a backend's forward/backward:
`flash_tpu` (Pallas Mosaic, scalar prefetch) or `flash_gpu` (Pallas Triton,
loops). Both share the tile math of flash_math.py.

Semantics that differ from the dense reference, on purpose: a query with no
allowed key (segment id 0, padding) outputs exactly 0 and passes no gradient,
where xla_attention averages all values uniformly. Losses mask padding, so
training is unaffected.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from tfusion.attention import MaskInfo, key_ranges_from_info
import tfusion.kernels.flash_gpu as flash_gpu
import tfusion.kernels.flash_tpu as flash_tpu
from tfusion.kernels.block_ranges import BlockRanges, pad_ranges

BACKENDS = {"tpu": flash_tpu, "gpu": flash_gpu}


@dataclasses.dataclass(frozen=True)
class FlashSettings:
    """Static kernel settings. interpret=None: interpret unless running on the
    backend's own platform (so the TPU kernel runs, slowly, on CPU)."""

    backend: str = "tpu"
    block_q: int = 128
    block_k: int = 128
    interpret: bool | None = None

    def resolved_interpret(self) -> bool:
        if self.interpret is not None:
            return self.interpret
        return jax.default_backend() != self.backend


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, k_start, k_end, scale, settings):
    return _flash_fwd(q, k, v, k_start, k_end, scale, settings)[0]


def _kernel_args(k, k_start, k_end, settings):
    ranges = BlockRanges.build(k_start, k_end, settings.block_q, settings.block_k,
                               k.shape[2] // settings.block_k)
    static = dict(block_q=settings.block_q, block_k=settings.block_k,
                  interpret=settings.resolved_interpret())
    return ranges, static


def _flash_fwd(q, k, v, k_start, k_end, scale, settings):
    ranges, static = _kernel_args(k, k_start, k_end, settings)
    backend = BACKENDS[settings.backend]
    out, lse = backend.forward(q, k, v, k_start, k_end, ranges, scale=scale, **static)
    return out, (q, k, v, k_start, k_end, out, lse)


def _flash_bwd(scale, settings, residuals, do):
    q, k, v, k_start, k_end, out, lse = residuals
    ranges, static = _kernel_args(k, k_start, k_end, settings)
    # delta_i = sum_d dO * O: the softmax-Jacobian term, cheap and fused by XLA.
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dq, dk, dv = BACKENDS[settings.backend].backward(
        q, k, v, k_start, k_end, ranges, lse, do.astype(q.dtype), delta, scale=scale,
        **static)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x, axis: int, multiple: int):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def flash_attention(q, k, v, info: MaskInfo, *, scale: float | None = None,
                    settings: FlashSettings = FlashSettings()) -> jax.Array:
    """Masked attention over the tiles the Transfusion mask allows; [B, Lq, H, Dh]."""
    lq, dh = q.shape[1], q.shape[3]
    scale = dh ** -0.5 if scale is None else float(scale)
    k_start, k_end = pad_ranges(*key_ranges_from_info(info), settings.block_q)
    heads_major = lambda x, block: _pad_to(x, 1, block).transpose(0, 2, 1, 3)
    out = _flash(heads_major(q, settings.block_q), heads_major(k, settings.block_k),
                 heads_major(v, settings.block_k), k_start, k_end, scale, settings)
    return out.transpose(0, 2, 1, 3)[:, :lq]
