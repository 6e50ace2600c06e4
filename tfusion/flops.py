"""Analytic training FLOPs of a Transfusion step, for MFU and scaling-law compute.

Counted per batch from what the batch really holds:
  - dense matmuls of every block at every text and patch position (padding is free);
  - attention scores and values over the pairs the mask allows (the block-sparse
    count; a dense kernel executes more, see `executed_stats`);
  - the LM head only at text positions (patch outputs go to the image decoder);
  - the modality layers once per real image.
Training = 3 x forward (backward is two matmuls per forward matmul). Embedding
lookups, norms and elementwise ops are not counted, as is customary.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tfusion.attention import key_ranges
from tfusion.config import ModelConfig
from tfusion.model.transfusion import linear_flops_per_image
from tfusion.model.unet import unet_flops_per_image


@dataclasses.dataclass(frozen=True)
class TokenStats:
    text_tokens: int  # non-pad text positions
    patch_tokens: int
    images: int
    attended_pairs: int  # (query, key) pairs allowed by the mask, summed over rows
    lm_positions: int  # positions whose logits are computed and used

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.patch_tokens


def batch_stats(batch, patches_per_image: int) -> TokenStats:
    seg, idx = np.asarray(batch["segment_ids"]), np.asarray(batch["image_index"])
    k_start, k_end = key_ranges(seg, idx, patches_per_image)
    text = int(((seg > 0) & (idx < 0)).sum())
    return TokenStats(text_tokens=text, patch_tokens=int((idx >= 0).sum()),
                      images=int(np.asarray(batch["image_mask"]).sum()),
                      attended_pairs=int((k_end - k_start).sum()), lm_positions=text)


def executed_stats(batch) -> TokenStats:
    """What the dense XLA path executes: every position, every (i, j) pair, logits everywhere."""
    b, l = np.asarray(batch["segment_ids"]).shape
    m = np.asarray(batch["image_mask"]).shape[1]
    return TokenStats(text_tokens=b * l, patch_tokens=0, images=b * m,
                      attended_pairs=b * l * l, lm_positions=b * l)


def block_matmul_params(model_cfg) -> int:
    """Weights one position multiplies through in one block (q, k, v, out, SwiGLU)."""
    m = ModelConfig.of(model_cfg)
    qkv = m.width * (m.num_heads + 2 * m.kv_heads) * m.head_dim
    out = m.num_heads * m.head_dim * m.width
    return qkv + out + 3 * m.width * m.mlp_dim


def modality_flops_per_image(model_cfg) -> int:
    m = ModelConfig.of(model_cfg)
    return unet_flops_per_image(m) if m.modality_layer == "unet" else linear_flops_per_image(m)


def forward_flops(model_cfg, stats: TokenStats) -> float:
    model_cfg = ModelConfig.of(model_cfg)
    dense = 2 * model_cfg.depth * block_matmul_params(model_cfg) * stats.tokens
    # q.k and p.v: 2 FLOPs per multiply-add, head_dim each, per head, per pair.
    attention = model_cfg.depth * 2 * 2 * model_cfg.num_heads * model_cfg.head_dim * stats.attended_pairs
    # The LM head as executed: padded_vocab_size columns (the padded ids' logits are
    # computed, then masked), like the U-Net's full kernels.
    lm_head = 2 * model_cfg.width * model_cfg.padded_vocab_size * stats.lm_positions
    modality = modality_flops_per_image(model_cfg) * stats.images
    return float(dense + attention + lm_head + modality)


def train_step_flops(model_cfg, batch) -> float:
    """Useful training FLOPs of one step on this (global) batch."""
    stats = batch_stats(batch, ModelConfig.of(model_cfg).patches_per_image)
    return 3.0 * forward_flops(model_cfg, stats)


def six_nd(num_params: int, tokens: int) -> float:
    """The paper's compute estimate C = 6ND (N params, D tokens)."""
    return 6.0 * num_params * tokens
