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
PATCH_SIZES = (1, 2, 4, 8)  # the paper's patch-size ablation (Section 4.3)
MODALITY_LAYERS = ("linear", "unet")
TEXT_VOCAB = 32_000 + 2  # Llama 2's 32K sentencepiece + BOI/EOI appended
SEQ_LEN = 4096
BATCH_ROWS = 512  # 512 x 4096 = 2M tokens per step
MAX_IMAGE_SLOTS = 64  # caps M for small patch counts (p8: 16 patches per image)

# U-Net channels per level (fine -> coarse), one level per halving of the latent
# plus the patch-grid level. The paper gives only ~0.27B params at patch 2 (these:
# 0.262B at width 4096); the other patch sizes keep the patch-grid width and halve
# it per finer level. Every width (and every skip concatenation, 1408 + 512 = 1920)
# is a multiple of 128, so the U-Net's fsdp sharding (tfusion/sharding.py) divides
# on the natural topologies (fsdp = 64 for 0.16B-0.76B, 128 for 1.4B and 7B:
# docs/experiments.md) and fills 128-wide MXU tiles; the earlier (640, 1344) widths
# did not divide over 128 devices (tests/model/test_sharding_scale.py).
UNET_CHANNELS = {1: (1408,), 2: (512, 1408), 4: (256, 512, 1408), 8: (128, 256, 512, 1408)}


def image_slots(seq_len: int, patches_per_image: int) -> int:
    """M: as many images as a row can physically hold (patches + BOI/EOI), capped.

    Fewer slots would cap the image share of a row below the 1:1 mixture's needs.
    """
    return max(1, min(MAX_IMAGE_SLOTS, seq_len // (patches_per_image + 2)))


def paper_config(size: str, modality_layer: str = "linear", patch_size: int = 2):
    """The paper's recipe at one size: seq 4096, 2M-token batches, 1:1 mixture,
    32x32x8 latents (256 px through an f8c8 VAE), Llama 2's 32K tokenizer + BOI/EOI.

    The optimizer and schedule are base.py's (the paper's AdamW, lr 3e-4, 4000
    warmup, cosine to 1.5e-5); 250K steps x 2M tokens = the paper's 0.5T tokens.
    """
    depth, width, heads = PAPER_SIZES[size]
    c = base_config()
    c.name = f"transfusion_{size}_{modality_layer}_p{patch_size}"
    c.model.update(depth=depth, width=width, num_heads=heads, vocab_size=TEXT_VOCAB,
                   latent_height=32, latent_width=32, latent_channels=8,
                   patch_size=patch_size, modality_layer=modality_layer,
                   unet_channels=UNET_CHANNELS[patch_size],
                   dtype="bfloat16", remat_policy="dots_no_batch",
                   # The block-sparse flash kernel of the platform (TPU/GPU), dense XLA
                   # on CPU (tfusion/kernels/__init__.py, docs/attention.md).
                   attention_kernel="auto")
    patches = (32 // patch_size) ** 2
    c.data.seq_len = SEQ_LEN
    c.data.max_images_per_row = image_slots(SEQ_LEN, patches)
    c.data.image_size = 256
    c.data.encoder = "vae"  # f8c8 VAE (latents issue); the paper's latent shape
    c.data.text_token_share = 0.5  # 1:1 text : image tokens
    c.train.batch_size = BATCH_ROWS
    # ZeRO-3 over every chip: 7B params + AdamW state (16 bytes/param) need sharding,
    # and 512 rows split evenly over up to 512 chips.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
