"""`config.autoencoder`: what launch/train_autoencoder.py trains, and its validation.

The architecture fields are AutoencoderConfig's (diffusers' names); the rest choose
the model kind, the losses and the optimizer. Data, batch size, steps and seed come
from the usual `config.data` / `config.train`.
"""
from __future__ import annotations

import ml_collections

from tfusion.autoencoders.config import AutoencoderConfig
from tfusion.autoencoders.training import LossConfig
from tfusion.config import ConfigError

KINDS = ("vae", "vq")
# launch/train_autoencoder.py saves the trained weights (diffusers format) in
# <workdir>/WEIGHTS_DIR: the directory data.encoder_path names.
WEIGHTS_DIR = "autoencoder"
RECONSTRUCTION_LOSSES = ("l1", "l2")


def autoencoder_section() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "vae"  # "vae": AutoencoderKL (Transfusion latents); "vq": VQ-VAE (baseline)
    # --- architecture (diffusers AutoencoderKL / VQModel config names) ---
    c.block_out_channels = (128, 256, 512, 512)  # downsample factor 2**(levels - 1)
    c.layers_per_block = 2
    c.latent_channels = 8  # paper: 8 (f8c8)
    c.norm_num_groups = 32
    c.mid_block_add_attention = True
    c.use_quant_conv = True
    c.use_post_quant_conv = True
    c.shift_factor = 0.0  # latent = (z - shift) * scale
    # 0 = measure after training: 1 / std of the posterior means on held-out images
    # (LDM's recipe), so the diffusion model sees unit-variance latents.
    c.scaling_factor = 0.0
    c.num_vq_embeddings = 16384  # vq: codebook size (paper's baseline: 16384)
    # --- losses ---
    c.reconstruction = "l1"  # "l1" or "l2"
    c.kl_weight = 1e-6  # vae: KL weight (per pixel value, as LDM's)
    c.adv_weight = 0.0  # patch-discriminator hinge term; 0 = off
    c.adv_start_step = 0  # the adversarial term (and discriminator training) start here
    c.discriminator_channels = 32
    # --- optimizer (Adam b1=0.5, b2=0.9, constant rate: the usual VAE/GAN choice) ---
    c.learning_rate = 1e-4
    c.eval_images = 64  # held-out images for the final PSNR and the scaling factor
    return c


def _fail(field: str, message: str):
    raise ConfigError(f"autoencoder.{field}", message)


def validate(config: ml_collections.ConfigDict) -> None:
    a = config.autoencoder
    if a.kind not in KINDS:
        _fail("kind", f"unknown {a.kind!r}; choose from {KINDS}")
    if a.reconstruction not in RECONSTRUCTION_LOSSES:
        _fail("reconstruction",
              f"unknown {a.reconstruction!r}; choose from {RECONSTRUCTION_LOSSES}")
    if not a.block_out_channels or any(w <= 0 for w in a.block_out_channels):
        _fail("block_out_channels", f"need positive widths, got {a.block_out_channels}")
    bad = [w for w in a.block_out_channels if w % a.norm_num_groups]
    if bad:
        _fail("norm_num_groups", f"{a.norm_num_groups} does not divide widths {bad}")
    for field in ("layers_per_block", "latent_channels", "num_vq_embeddings", "learning_rate",
                  "eval_images", "discriminator_channels"):
        if a[field] <= 0:
            _fail(field, f"must be positive, got {a[field]!r}")
    for field in ("kl_weight", "adv_weight", "adv_start_step", "scaling_factor"):
        if a[field] < 0:
            _fail(field, f"must be >= 0, got {a[field]!r}")
    factor = 2 ** (len(a.block_out_channels) - 1)
    if config.data.image_size % factor:
        raise ConfigError("data.image_size", f"{config.data.image_size} is not divisible by the "
                                             f"autoencoder's downsample factor {factor}")


def architecture(section: ml_collections.ConfigDict,
                 scaling_factor: float | None = None) -> AutoencoderConfig:
    return AutoencoderConfig(
        block_out_channels=tuple(section.block_out_channels),
        layers_per_block=section.layers_per_block, latent_channels=section.latent_channels,
        norm_num_groups=section.norm_num_groups,
        mid_block_add_attention=section.mid_block_add_attention,
        use_quant_conv=section.use_quant_conv, use_post_quant_conv=section.use_post_quant_conv,
        scaling_factor=scaling_factor or section.scaling_factor or 1.0,
        shift_factor=section.shift_factor or None, num_vq_embeddings=section.num_vq_embeddings)


def loss_config(section: ml_collections.ConfigDict) -> LossConfig:
    return LossConfig(reconstruction=section.reconstruction, kl_weight=section.kl_weight,
                      adv_weight=section.adv_weight, adv_start_step=section.adv_start_step)
