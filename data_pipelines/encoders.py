"""data.encoder by name: how an image record becomes the latent a row carries.

identity / vae / vq are the library's image codecs (tfusion/autoencoders/image_codec.py:
encode for training, decode for sampling). `precomputed` is the data side's own: the
latents were encoded offline (launch/encode_latents.py) and come with their records, so
nothing is encoded here and there is no decoder.
"""
from __future__ import annotations

import os

from tfusion.autoencoders.image_codec import CODECS, WEIGHT_CODECS, ImageCodec, image_codec

# Encoders that need data.encoder_path (weights, or a latents directory).
PATH_ENCODERS = WEIGHT_CODECS + ("precomputed",)


def names() -> tuple[str, ...]:
    return CODECS + ("precomputed",)


def _refuse_encode(image):
    raise RuntimeError("precomputed latents come with their records; nothing is encoded")


def _precomputed(path: str) -> ImageCodec:
    from data_pipelines.latents_source import read_metadata

    meta = read_metadata(path)

    def latent_shape(px):
        if px != meta["image_size"]:
            raise ValueError(f"latents in {path} were encoded at {meta['image_size']} px, "
                             f"not {px}")
        return tuple(meta["latent_shape"])

    return ImageCodec(latent_shape=latent_shape, encode=_refuse_encode)


def resolve(name: str, path: str = "") -> ImageCodec:
    """The encoder of data.encoder / data.encoder_path."""
    return _precomputed(path) if name == "precomputed" else image_codec(name, path)


def check_path(name: str, path: str) -> str:
    """'' if `path` suits encoder `name`, else what is wrong (for ConfigError)."""
    if not path:
        return f"encoder {name!r} needs encoder_path"
    wanted = "metadata.json" if name == "precomputed" else "config.json"
    if not os.path.exists(os.path.join(path, wanted)):
        return f"{path!r} has no {wanted}"
    return ""
