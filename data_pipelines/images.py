"""Image preparation: decode, convert to RGB, centre-crop, resize, scale to [-1, 1].

Accepts encoded bytes, uint8 arrays or PIL images. Unusable input raises
BadRecord(reason); conversions that rescue an image are returned as repair names so
statistics count them.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image

from data_pipelines.records import BadRecord

# Modes PIL may hand us, mapped to the repair name counted when we convert them.
_CONVERSIONS = {"L": "grayscale_to_rgb", "1": "grayscale_to_rgb", "I": "grayscale_to_rgb",
                "I;16": "grayscale_to_rgb", "F": "grayscale_to_rgb",
                "LA": "alpha_to_rgb", "RGBA": "alpha_to_rgb", "P": "palette_to_rgb",
                "PA": "palette_to_rgb", "CMYK": "cmyk_to_rgb", "YCbCr": "ycbcr_to_rgb"}
MAX_PIXELS = 64_000_000  # larger images are refused rather than risk memory blow-up
# PIL names the in-memory stream by its address; dropped so skip examples (kept in
# pipeline state) are the same on every run.
_STREAM_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def _decode(data: bytes) -> Image.Image:
    if len(data) == 0:
        raise BadRecord("empty_image_bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise BadRecord("image_too_large", f"{image.size}")
            image.load()  # truncated files fail here, not in open()
    except BadRecord:
        raise
    except Exception as e:  # PIL raises many types for broken files
        message = _STREAM_REPR.sub("", str(e))
        raise BadRecord("corrupt_image", f"{type(e).__name__}: {message}") from None
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise BadRecord("unsupported_image_array", f"dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise BadRecord("unsupported_image_array", f"shape {array.shape}")
    if 0 in array.shape[:2]:
        raise BadRecord("zero_size_image")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image: Image.Image) -> tuple[Image.Image, tuple[str, ...]]:
    if image.mode == "RGB":
        return image, ()
    repair = _CONVERSIONS.get(image.mode, f"{image.mode.lower()}_to_rgb")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become black, the shapes set's background.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I", "I;16", "F"):
        scale = 1.0 / 256 if image.mode == "I;16" or np.asarray(image).max() > 255 else 1.0
        image = Image.fromarray(np.clip(np.asarray(image) * scale, 0, 255).astype(np.uint8))
    return image.convert("RGB"), (repair,)


def centre_crop_resize(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def prepare_image(source, size: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Returns (float32 [size, size, 3] in [-1, 1], repairs) or raises BadRecord."""
    if source is None:
        raise BadRecord("missing_image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(bytes(source))
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, Image.Image):
        image = source
    else:
        raise BadRecord("unsupported_image_type", type(source).__name__)
    if image.width == 0 or image.height == 0:
        raise BadRecord("zero_size_image")
    try:
        image, repairs = _to_rgb(image)
        image = centre_crop_resize(image, size)
    except BadRecord:
        raise
    except Exception as e:  # exotic modes PIL cannot convert
        raise BadRecord("unconvertible_image", f"{type(e).__name__}: {e}") from None
    pixels = np.asarray(image, dtype=np.float32)
    return pixels / 127.5 - 1.0, repairs
