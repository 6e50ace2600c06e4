"""Autoencoder experiments (launch/train_autoencoder.py) on the built-in shapes."""
from __future__ import annotations

from data_pipelines.config import shapes_tiny_data
from experiments.base import base_config
from tfusion.autoencoders.train_config import autoencoder_section


def _shapes_autoencoder(name: str, kind: str):
    c = base_config()
    c.name = name
    c.data = shapes_tiny_data()
    c.data.image_size = 32
    c.autoencoder = autoencoder_section()
    # f4: 32 px -> 8x8 latents; small enough to train in minutes on 2 CPU cores.
    # L2: on mostly-black shapes L1 settles for blurry shapes (measured: 16.4 dB held-out
    # PSNR after 400 steps with L1 + adversarial term vs ~24 dB with L2 alone).
    c.autoencoder.update(kind=kind, block_out_channels=(16, 32, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, learning_rate=1e-3,
                         reconstruction="l2", kl_weight=1e-6, eval_images=64)
    c.train.update(steps=400, batch_size=16, log_every=25, seed=0)
    return c


def vae_shapes_tiny():
    """f4c4 AutoencoderKL on 32 px shapes, L2 + KL. The patch-GAN term is off (it costs
    PSNR at this length); --config.autoencoder.adv_weight=0.05 turns it on from step 300."""
    c = _shapes_autoencoder("vae_shapes_tiny", "vae")
    c.autoencoder.update(adv_weight=0.0, adv_start_step=300)
    return c


def vq_shapes_tiny():
    """f4 VQ-VAE on 32 px shapes, 256 codes of width 4 (the paper's baseline uses 16384)."""
    c = _shapes_autoencoder("vq_shapes_tiny", "vq")
    c.autoencoder.update(num_vq_embeddings=256)
    return c


def vq_shapes_micro():
    """f4 VQ-VAE on 16 px shapes, 256 codes: the image tokenizer of the CPU micro
    Chameleon runs (a 16 px image -> 4 x 4 = 16 tokens; experiments/micro.py)."""
    c = _shapes_autoencoder("vq_shapes_micro", "vq")
    c.data.image_size = 16
    c.autoencoder.update(num_vq_embeddings=256)
    return c
