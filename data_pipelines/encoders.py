"""Latent encoders by name: image in [-1, 1] (H, W, 3) -> clean latent the model sees.

`identity` uses pixels as latents (latent H, W, C = px, px, 3) for tiny runs. A VAE
registers here later with its own latent shape and scaling; the pipeline only needs
`latent_shape` (validated against the model config) and `encode`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Encoder:
    # image_size -> (H, W, C) of the latent
    latent_shape: Callable[[int], tuple[int, int, int]]
    # float32 [px, px, 3] in [-1, 1] -> float32 latent of latent_shape(px)
    encode: Callable[[np.ndarray], np.ndarray]
    # latent of latent_shape(px) -> float32 [px, px, 3] (what sampled images go
    # through); None: none exists (precomputed latents), so no image metrics
    decode: Optional[Callable[[np.ndarray], np.ndarray]] = None


ENCODERS: dict[str, Encoder] = {}


def register(name: str, encoder: Encoder) -> None:
    ENCODERS[name] = encoder


def latent_shape(name: str, image_size: int) -> tuple[int, int, int]:
    return tuple(ENCODERS[name].latent_shape(image_size))


# Encoders that need data.encoder_path (VAE/VQ weights or a latents directory),
# built by data_pipelines/latent_encoders.py; imported lazily so identity users never
# import the autoencoder models.
PATH_ENCODERS = ("vae", "vq", "precomputed")


def names() -> tuple[str, ...]:
    return (*ENCODERS, *PATH_ENCODERS)


def resolve(name: str, path: str = "") -> Encoder:
    """The encoder of data.encoder / data.encoder_path."""
    if name in PATH_ENCODERS:
        from data_pipelines import latent_encoders

        return latent_encoders.build(name, path)
    return get(name)


def get(name: str) -> Encoder:
    if name not in ENCODERS:
        raise KeyError(f"unknown encoder {name!r}; registered: {sorted(ENCODERS)}")
    return ENCODERS[name]


register("identity", Encoder(
    latent_shape=lambda px: (px, px, 3),
    encode=lambda image: np.asarray(image, np.float32),
    decode=lambda latent: np.asarray(latent, np.float32),
))
