"""cuDNN fused attention with the dense Transfusion mask: a GPU correctness and
speed baseline for flash_gpu, not a production path (the [B, L, L] boolean mask
is materialised, and cuDNN cannot skip the fully masked tiles)."""
from __future__ import annotations

import jax

from tfusion.attention import MaskInfo, mask_from_info


def cudnn_attention(q, k, v, info: MaskInfo, *, scale: float | None = None) -> jax.Array:
    mask = mask_from_info(info)[:, None]  # [B, 1, Lq, Lk], broadcast over heads
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                        implementation="cudnn")
