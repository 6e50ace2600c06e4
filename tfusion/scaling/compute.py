"""Parameters, tokens and training FLOPs of a run, as the scaling laws count them."""
from __future__ import annotations

import functools
import json

import ml_collections

from tfusion import flops
from tfusion.config import is_discrete
from tfusion.train.params import abstract_model, count_params_by_part

IMAGE_LAYER_PARTS = ("image_encoder", "image_decoder")


@functools.lru_cache(maxsize=256)
def _params_by_part(model_json: str) -> dict:
    model_cfg = ml_collections.ConfigDict(json.loads(model_json))
    _, params = abstract_model(model_cfg)
    return count_params_by_part(params)


def trained_params(model_cfg) -> int:
    """N: every parameter that gets gradients (abstract count, nothing allocated).

    The discrete (Chameleon) baseline builds the image modality layers but never
    feeds them (M = 0 image slots), so they are not counted for it.
    """
    parts = _params_by_part(json.dumps(model_cfg.to_dict(), sort_keys=True, default=list))
    skip = IMAGE_LAYER_PARTS if is_discrete(model_cfg) else ()
    return sum(n for part, n in parts.items() if part not in skip)


def tokens_per_step(config) -> int:
    """D per step: every position of every row (the paper's 2M-token batches)."""
    return int(config.train.batch_size * config.data.seq_len)


def measured_step_flops(model_cfg, batches) -> float:
    """Mean exact train-step FLOPs (tfusion.flops) over sample batches of the run's data."""
    values = [flops.train_step_flops(model_cfg, b) for b in batches]
    return sum(values) / len(values)
