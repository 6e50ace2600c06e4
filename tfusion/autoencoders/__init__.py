"""Image autoencoders: AutoencoderKL (Transfusion's latents) and the VQ-VAE (baseline).

Architecture and parameter names follow diffusers, so diffusers-format weights
(SD-VAE, FLUX, ...) load directly; see docs/latents.md.
"""
from tfusion.autoencoders.autoencoder_kl import (AutoencoderKL, Posterior, jit_decode,
                                                 jit_encode, jit_method, scale_latents,
                                                 unscale_latents)
from tfusion.autoencoders.config import AutoencoderConfig, from_diffusers_dict
from tfusion.autoencoders.diffusers_weights import load_pretrained, save_pretrained
from tfusion.autoencoders.vq import VQModel

__all__ = ["AutoencoderKL", "AutoencoderConfig", "Posterior", "VQModel", "from_diffusers_dict",
           "jit_decode", "jit_encode", "jit_method", "load_pretrained", "save_pretrained",
           "scale_latents", "unscale_latents"]
