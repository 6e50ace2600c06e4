"""The paper's model sizes and recipe (Transfusion, Table 2 and Section 4)."""
from __future__ import annotations

from experiments.base import base_config

# name -> (layers, width, heads), Table 2 of the paper.
PAPER_SIZES = {
    "0.16B": (16, 768, 12),
    "0.37B": (24, 1024, 16),
    "0.76B": (24, 1536, 24),
    "1.4B": (24, 2048, 16),
    "7B": (32, 4096, 32),
}
PAPER_PARAMS = {"0.16B": 0.16e9, "0.37B": 0.37e9, "0.76B": 0.76e9, "1.4B": 1.4e9, "7B": 7e9}


def paper_config(size: str, modality_layer: str = "linear", patch_size: int = 2):
    """The paper's recipe at one size: seq 4096, 2M-token batches, 1:1 mixture,
    32x32x8 latents (256 px through an f8c8 VAE), Llama 2's 32K tokenizer + BOI/EOI."""
    depth, width, heads = PAPER_SIZES[size]
    c = base_config()
    c.name = f"transfusion_{size}"
    c.model.update(depth=depth, width=width, num_heads=heads, vocab_size=32_002,
                   latent_height=32, latent_width=32, latent_channels=8,
                   patch_size=patch_size, modality_layer=modality_layer,
                   dtype="bfloat16", remat_policy="dots_no_batch")
    c.data.seq_len = 4096
    c.data.max_images_per_row = 16
    c.data.image_size = 256
    c.data.encoder = "vae"  # f8c8 VAE (latents issue); the paper's latent shape
    c.train.batch_size = 512  # 512 x 4096 = 2M tokens per step
    c.data.text_token_share = 0.5
    return c
