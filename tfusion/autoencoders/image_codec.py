"""Image codecs by name: pixels in [-1, 1] <-> the latent a model sees, and back.

  identity  pixels are the latents (H, W, C = px, px, 3), for tiny runs;
  vae       the continuous latents of an AutoencoderKL (data.encoder_path = its weights);
  vq        a VQ model's code ids, [h, w, 1] int (the discrete baseline's image tokens).

The data pipeline encodes training images with `encode`; sampling decodes generated
latents to pixels with `decode`. Weights load lazily on the first call (and again in
each grain worker process, since the loaded model is not pickled), so config validation
only reads config.json.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageCodec:
    # image_size -> (H, W, C) of the latent
    latent_shape: Callable[[int], tuple[int, int, int]]
    # float32 [px, px, 3] in [-1, 1] -> float32 latent of latent_shape(px)
    encode: Callable[[np.ndarray], np.ndarray]
    # latent of latent_shape(px) -> float32 [px, px, 3]; None: no decoder exists
    # (precomputed latents), so sampled images cannot become pixels
    decode: Optional[Callable[[np.ndarray], np.ndarray]] = None


IDENTITY = ImageCodec(latent_shape=lambda px: (px, px, 3),
                      encode=lambda image: np.asarray(image, np.float32),
                      decode=lambda latent: np.asarray(latent, np.float32))
WEIGHT_CODECS = ("vae", "vq")  # need the autoencoder's weights directory
CODECS = ("identity",) + WEIGHT_CODECS


class _LazyMethod:
    """One array -> `method` of the model at `path` (jitted, batch 1): an image
    [px, px, 3] -> its latent (encode, encode_ids) or back (decode, decode_ids).
    VQ ids are [h, w, 1] on our side, [h, w] on the model's."""

    def __init__(self, path: str, method: str):
        self.path, self.method, self._fn = path, method, None

    def __getstate__(self):
        return {"path": self.path, "method": self.method, "_fn": None}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._fn is None:
            # Late: loading builds the model; identity users never pay for it.
            from tfusion.autoencoders.autoencoder_kl import jit_method
            from tfusion.autoencoders.diffusers_weights import load_pretrained

            self._fn = jit_method(load_pretrained(self.path), self.method)
        x = np.asarray(x)
        x = np.rint(x[..., 0]).astype(np.int32) if self.method == "decode_ids" else x.astype(np.float32)
        out = np.asarray(self._fn(x[None]))[0]
        return out[..., None] if out.ndim == 2 else out  # VQ ids [h, w] -> [h, w, 1]


def image_codec(name: str, path: str = "") -> ImageCodec:
    """The codec of data.encoder / data.encoder_path."""
    if name == "identity":
        return IDENTITY
    if name not in WEIGHT_CODECS:
        raise KeyError(f"unknown image codec {name!r}; known: {CODECS}")
    from tfusion.autoencoders.diffusers_weights import read_config

    architecture = read_config(path)[0]
    if name == "vae":
        return ImageCodec(latent_shape=architecture.latent_shape,
                          encode=_LazyMethod(path, "encode"), decode=_LazyMethod(path, "decode"))

    def code_grid(px):
        h, w, _ = architecture.latent_shape(px)
        return h, w, 1

    return ImageCodec(latent_shape=code_grid, encode=_LazyMethod(path, "encode_ids"),
                      decode=_LazyMethod(path, "decode_ids"))
