"""A PNG grid of images, each with its text (prompt or caption) underneath."""
from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pixels in [-1, 1] -> uint8 [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_grid(path: str, images: np.ndarray, texts: Sequence[str], columns: int = 8,
               cell: int = 128, text_lines: int = 7) -> str:
    """images [N, H, W, 3] in [-1, 1]; texts[i] is printed under image i. Returns path."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    font = ImageFont.load_default()
    line_height = 11
    chars_per_line = max(8, cell // 6)
    rows = -(-len(images) // columns)
    height = cell + text_lines * line_height + 4
    canvas = Image.new("RGB", (columns * cell, max(rows, 1) * height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (image, text) in enumerate(zip(to_uint8(images), texts)):
        x, y = (i % columns) * cell, (i // columns) * height
        # Nearest-neighbour upscaling by a whole factor shows a 16 px image's real pixels
        # (what was scored), each as an equal square block.
        scale = max(1, (cell - 4) // max(image.shape[0], image.shape[1]))
        tile = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).resize(
            (image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST)
        canvas.paste(tile, (x + 2 + (cell - 4 - tile.width) // 2, y + 2))
        lines = textwrap.wrap(text, chars_per_line)[:text_lines]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + cell + j * line_height), line, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path
