"""Image folders with known faults, shared by the data and training fault tests."""
import io
import json

import numpy as np
from PIL import Image

from data_pipelines import example_config
from data_pipelines.file_sources import CAPTIONS_FILE

FOLDER_IMAGES = 40
CORRUPT = frozenset(i for i in range(FOLDER_IMAGES) if i % 10 in (1, 4, 7))  # 30%


def image_name(i: int) -> str:
    return f"img{i:03d}.png"


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(directory, n=FOLDER_IMAGES, corrupt=frozenset(), image_key="file",
                 caption_key="caption"):
    for i in range(n):
        data = png_bytes(i)
        (directory / image_name(i)).write_bytes(data[:len(data) // 2] if i in corrupt else data)
    lines = [json.dumps({image_key: image_name(i), caption_key: f"a square number {i}"})
             for i in range(n)]
    (directory / CAPTIONS_FILE).write_text("\n".join(lines) + "\n")
    return str(directory)


def data_config_for(tok_dir, data_dir="", source="folder"):
    """Unshuffled image-only stream of single-image documents: document i of the packer
    is record i % len(records) of the train split (the whole folder)."""
    c = example_config.get_config()
    c.data.tokenizer_cache_dir = tok_dir
    c.data.source, c.data.data_dir = source, data_dir
    c.data.text_source = "none"
    c.data.multi_image_fraction = 0.0
    c.data.eval_examples = 0
    c.data.shuffle = False
    return c
