"""Attention kernels by the name config.model.attention_kernel gives, and the one entry
point the model calls (`dot_product_attention`):

  xla        dense masked attention in plain XLA (tfusion/attention.py): the default
             and the reference
  flash_tpu  block-sparse Pallas TPU kernel (interpreted when not on TPU)
  flash_gpu  block-sparse Pallas Triton kernel (interpreted when not on GPU)
  auto       flash_tpu on TPU, flash_gpu on GPU, the dense xla path on CPU: one config
             for every platform (the paper configs' default)
  flash      an alias of auto (the name before auto; configs of earlier runs use it)
  cudnn      cuDNN with the dense mask (GPU only; a baseline)
"""
from __future__ import annotations

import functools
from typing import Callable

import jax

from tfusion import attention, config as config_lib
from tfusion.kernels.cudnn import cudnn_attention
from tfusion.kernels.flash import FlashSettings, flash_attention
from tfusion.kernels.sharded import shard_over_mesh

# 128 x 128 tiles fill the TPU MXU; Triton prefers smaller tiles (registers).
SETTINGS = {"flash_tpu": FlashSettings("tpu", 128, 128),
            "flash_gpu": FlashSettings("gpu", 64, 64)}


def flash_kernel(settings: FlashSettings):
    """An attention.KERNELS entry for these settings, sharded over the active mesh."""

    def kernel(q, k, v, info, *, scale=None):
        per_shard = functools.partial(flash_attention, scale=scale, settings=settings)
        return shard_over_mesh(per_shard)(q, k, v, info)

    return kernel


def platform_flash(q, k, v, info, *, scale=None):
    """`auto`: the platform's flash kernel, or the dense XLA path where there is none."""
    name = {"tpu": "flash_tpu", "gpu": "flash_gpu"}.get(jax.default_backend(), "xla")
    return KERNELS[name](q, k, v, info, scale=scale)


AttentionKernel = Callable[..., jax.Array]
KERNELS: dict[str, AttentionKernel] = {
    "xla": attention.xla_attention,
    **{name: flash_kernel(settings) for name, settings in SETTINGS.items()},
    "auto": platform_flash,
    "flash": platform_flash,
    "cudnn": cudnn_attention,
}
assert tuple(KERNELS) == config_lib.ATTENTION_KERNELS, "config.ATTENTION_KERNELS is stale"


def dot_product_attention(q, k, v, info: attention.MaskInfo, *, kernel: str = "xla",
                          scale: float | None = None) -> jax.Array:
    """q [B, Lq, H, Dh], k/v [B, Lk, Hkv, Dh] -> [B, Lq, H, Dh] with `kernel`."""
    try:
        fn = KERNELS[kernel]
    except KeyError:
        raise ValueError(f"unknown attention kernel {kernel!r}; known: {sorted(KERNELS)}")
    return fn(q, k, v, info, scale=scale)
