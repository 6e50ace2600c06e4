"""Held-out reference examples (image, caption, ground truth) for generation evals.

Read from the configured image source's "eval" split, the same records that
make_eval_iterator packs, so prompts are captions the model never trained on
(for `shapes`: scenes drawn from the eval seed, whose multi-shape compositions are
new with overwhelming probability) and FID's real images are held out too.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from data_pipelines.images import prepare_image
from data_pipelines.records import BadRecord, clean_text
from data_pipelines.sources import pair_source


@dataclasses.dataclass(frozen=True)
class Reference:
    image: np.ndarray  # float32 [px, px, 3] in [-1, 1]
    caption: str
    attributes: Optional[list]  # per-shape dicts for `shapes`, None for other sources


def heldout_references(config, count: int, split: str = "eval") -> list[Reference]:
    """The first `count` usable records of the split (unreadable ones are skipped)."""
    records = pair_source(config.data, split)
    out = []
    for index in range(len(records)):
        if len(out) == count:
            break
        record = records[index]
        try:
            if record.error:
                raise BadRecord(record.error)
            image, _ = prepare_image(record.image, config.data.image_size)
            caption, _ = clean_text(record.caption, "empty_caption")
        except BadRecord:
            continue
        out.append(Reference(image, caption, record.attributes))
    if len(out) < count:
        raise ValueError(f"the {split} split has only {len(out)} usable records, "
                         f"{count} requested")
    return out
