"""The Chameleon-style baseline: images as discrete VQ tokens in the same transformer.

Same backbone, optimizer, trainer and FLOPs accounting as Transfusion; what
changes (paper, Section 4.1 baseline):
  - the vocabulary is extended by the VQ codebook (ids after the text vocabulary,
    BOI/EOI kept), and an image is `image_tokens` ordinary token ids;
  - the batch has no image slots (M = 0), so tfusion.losses puts the LM loss on
    every token, image tokens included, and the diffusion term is empty;
  - QK-norm and z-loss, which Chameleon needs for stability.
"""
from __future__ import annotations

from tfusion.config import ConfigError, image_token_offset, is_discrete  # noqa: F401  (re-exported)

CODEBOOK_SIZE = 16_384  # paper / Chameleon's image tokenizer
IMAGE_TOKENS = 1024  # tokens per 512 px image (32 x 32 codes)
Z_LOSS_WEIGHT = 1e-5


def make_discrete(c, codebook_size: int = CODEBOOK_SIZE, image_tokens: int = IMAGE_TOKENS,
                  z_loss_weight: float = Z_LOSS_WEIGHT):
    """Turns a Transfusion config into its Chameleon-style counterpart, in place.

    model.vocab_size must hold the text vocabulary (BOI/EOI included) on entry.
    """
    c.model.image_representation = "discrete"
    c.model.codebook_size = codebook_size
    c.model.image_tokens = image_tokens
    c.model.vocab_size = c.model.vocab_size + codebook_size
    c.model.qk_norm = True
    c.loss.z_loss_weight = z_loss_weight
    c.data.max_images_per_row = 0  # M = 0: images travel as token ids
    c.data.encoder = "vq"  # VQ tokenizer (autoencoder issue) turns images into code ids
    return c
