"""Fast attention kernels. Importing this package (tfusion.attention does) registers
them in attention.KERNELS under the names config.model.attention_kernel accepts:

  flash_tpu  block-sparse Pallas TPU kernel (interpreted when not on TPU)
  flash_gpu  block-sparse Pallas Triton kernel (interpreted when not on GPU)
  flash      flash_tpu on TPU, flash_gpu on GPU, the dense xla path on CPU
  cudnn      cuDNN with the dense mask (GPU only; a baseline)

"xla" (dense, tfusion/attention.py) stays the default and the reference.
"""
from __future__ import annotations

import functools

import jax

from tfusion import attention
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
    name = {"tpu": "flash_tpu", "gpu": "flash_gpu"}.get(jax.default_backend(), "xla")
    return attention.KERNELS[name](q, k, v, info, scale=scale)


for _name, _settings in SETTINGS.items():
    attention.register_kernel(_name, flash_kernel(_settings))
attention.register_kernel("flash", platform_flash)
attention.register_kernel("cudnn", cudnn_attention)
