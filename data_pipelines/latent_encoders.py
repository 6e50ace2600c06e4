"""Encoders built from `data.encoder_path`: vae, vq (weights) and precomputed (shards).

Registered by name in data_pipelines/encoders.py. Weights load lazily on the first
encode (and again in each grain worker process, since the loaded model is not
pickled), so validation and batch_spec only read config.json / metadata.json.
"""
from __future__ import annotations

import os

import numpy as np

from data_pipelines.encoders import Encoder


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
            from tfusion.autoencoders import diffusers_weights, jit_method

            self._fn = jit_method(diffusers_weights.load_pretrained(self.path), self.method)
        x = np.asarray(x)
        x = np.rint(x[..., 0]).astype(np.int32) if self.method == "decode_ids" else x.astype(np.float32)
        out = np.asarray(self._fn(x[None]))[0]
        return out[..., None] if out.ndim == 2 else out  # VQ ids [h, w] -> [h, w, 1]


def _architecture(path: str):
    from tfusion.autoencoders.diffusers_weights import read_config

    return read_config(path)[0]


def _vae(path: str) -> Encoder:
    cfg = _architecture(path)
    return Encoder(latent_shape=cfg.latent_shape, encode=_LazyMethod(path, "encode"),
                   decode=_LazyMethod(path, "decode"))


def _vq(path: str) -> Encoder:
    cfg = _architecture(path)

    def latent_shape(px):
        h, w, _ = cfg.latent_shape(px)
        return h, w, 1

    return Encoder(latent_shape=latent_shape, encode=_LazyMethod(path, "encode_ids"),
                   decode=_LazyMethod(path, "decode_ids"))


def _refuse_encode(image):
    raise RuntimeError("precomputed latents come with their records; nothing is encoded")


def _precomputed(path: str) -> Encoder:
    from data_pipelines.latents_source import read_metadata

    meta = read_metadata(path)

    def latent_shape(px):
        if px != meta["image_size"]:
            raise ValueError(f"latents in {path} were encoded at {meta['image_size']} px, "
                             f"not {px}")
        return tuple(meta["latent_shape"])

    return Encoder(latent_shape=latent_shape, encode=_refuse_encode)


FACTORIES = {"vae": _vae, "vq": _vq, "precomputed": _precomputed}


def build(name: str, path: str) -> Encoder:
    return FACTORIES[name](path)


def check_path(name: str, path: str) -> str:
    """'' if `path` suits encoder `name`, else what is wrong (for ConfigError)."""
    if not path:
        return f"encoder {name!r} needs encoder_path"
    wanted = "metadata.json" if name == "precomputed" else "config.json"
    if not os.path.exists(os.path.join(path, wanted)):
        return f"{path!r} has no {wanted}"
    return ""
