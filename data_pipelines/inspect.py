"""Look at what the pipeline produces for a config.

  python -m data_pipelines.inspect --config=data_pipelines/example_config.py \
      [--config.data.image_size=32 ...] [--batches=4] [--rows=4] [--png=rows.png]

Prints batch shapes, packing efficiency, mixture weights, skipped/repaired counts
by reason with the first skipped record of each reason, and writes a PNG of the first rows: each row's images and its decoded
documents (<boi>/<eoi> mark where the image patches sit).
"""
from __future__ import annotations

import json
import textwrap

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image, ImageDraw

from data_pipelines.config import validate_data_config
from data_pipelines.pipeline import make_train_iterator
from data_pipelines.tokenizer import Tokenizer, build_tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file with get_config()")
_BATCHES = flags.DEFINE_integer("batches", 4, "batches to draw for the statistics")
_ROWS = flags.DEFINE_integer("rows", 4, "rows of the first batch drawn into the PNG")
_PNG = flags.DEFINE_string("png", "data_pipeline_rows.png", "where to write the picture")

TILE = 64  # px per image in the picture


def describe_row(batch: dict, row: int, tok: Tokenizer, patches: int) -> list[str]:
    """One string per document in the row: text with <boi>[image m]<eoi> markers."""
    seg, idx, ids = batch["segment_ids"][row], batch["image_index"][row], batch["tokens"][row]
    names = {tok.bos_id: "<bos>", tok.eos_id: "<eos>", tok.boi_id: "<boi>", tok.eoi_id: "<eoi>"}
    p = patches
    docs = []
    for d in range(1, int(seg.max(initial=0)) + 1):
        parts, run = [], []
        for i in np.flatnonzero(seg == d):
            if idx[i] >= 0 or int(ids[i]) in names:
                if run:
                    parts.append(tok.decode(run))
                    run = []
                if idx[i] >= 0 and idx[i] % p == 0:
                    parts.append(f"[image {idx[i] // p}]")
                elif idx[i] < 0:
                    parts.append(names[int(ids[i])])
            else:
                run.append(int(ids[i]))
        if run:
            parts.append(tok.decode(run))
        docs.append(" ".join(parts))
    return docs


def to_pixels(latent: np.ndarray) -> Image.Image:
    """Latent -> RGB tile: the first three channels stretched from [-1, 1]."""
    channels = latent[..., :3] if latent.shape[-1] >= 3 else np.repeat(latent[..., :1], 3, -1)
    rgb = np.clip((channels + 1.0) * 127.5, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb).resize((TILE, TILE), Image.Resampling.NEAREST)


def draw_rows(batch: dict, rows: int, tok: Tokenizer, patches: int, width: int = 900) -> Image.Image:
    panels = []
    for r in range(min(rows, batch["tokens"].shape[0])):
        lines = [f"row {r}:"]
        for d, text in enumerate(describe_row(batch, r, tok, patches), start=1):
            lines += textwrap.wrap(f"doc {d}: {text}", width=140) or [f"doc {d}:"]
        slots = np.flatnonzero(batch["image_mask"][r])
        panel = Image.new("RGB", (width, TILE + 14 * len(lines) + 12), "white")
        for k, m in enumerate(slots):
            panel.paste(to_pixels(batch["images"][r, m]), (k * (TILE + 4), 0))
        ImageDraw.Draw(panel).multiline_text((2, TILE + 4), "\n".join(lines), fill="black")
        panels.append(panel)
    out = Image.new("RGB", (width, sum(p.height for p in panels)), "white")
    y = 0
    for panel in panels:
        out.paste(panel, (0, y))
        y += panel.height
    return out


def main(argv):
    del argv
    config = _CONFIG.value
    validate_data_config(config)
    tok = build_tokenizer(config)
    it = make_train_iterator(config)
    batches = [next(it) for _ in range(_BATCHES.value)]
    stats, examples = it.stats(), it.skip_examples()
    it.close()
    print("batch shapes:", {k: (tuple(v.shape), str(v.dtype)) for k, v in batches[0].items()})
    print(f"packing efficiency: {stats.packing_efficiency:.4f} "
          f"({stats.nonpad_tokens}/{stats.row_tokens} positions)")
    print("mixture (document probabilities):", json.dumps(it.mixture_weights))
    print("skipped by reason:", json.dumps(stats.skipped))
    for reason, detail in examples.items():
        print(f"  first {reason}: {detail}")
    print("repaired by reason:", json.dumps(stats.repaired))
    print("stats:", json.dumps(stats.to_dict()))
    draw_rows(batches[0], _ROWS.value, tok, it.spec.patches_per_image).save(_PNG.value)
    print(f"wrote {_PNG.value}")


if __name__ == "__main__":
    app.run(main)
