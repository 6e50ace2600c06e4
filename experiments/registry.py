"""Experiment registry: `--config=experiments/registry.py:NAME` resolves NAME here.

Each entry is a builder and a one-line description. `get_config(name)` is what
ml_collections' config_flags calls.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple

# config_flags loads this file by path; make the repo importable from it.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from experiments import paper, shapes  # noqa: E402


class Experiment(NamedTuple):
    build: Callable
    description: str


def _paper_entries() -> dict[str, Experiment]:
    out = {}
    for size in paper.PAPER_SIZES:
        out[f"transfusion_{size}"] = Experiment(
            lambda s=size: paper.paper_config(s),
            f"Transfusion {size}, linear patch layers, patch 2, the paper's recipe")
        out[f"transfusion_{size}_unet"] = Experiment(
            lambda s=size: _named(paper.paper_config(s, modality_layer="unet"),
                                  f"transfusion_{s}_unet"),
            f"Transfusion {size} with U-Net down/up modality layers, patch 2")
    return out


def _named(config, name):
    config.name = name
    return config


EXPERIMENTS: dict[str, Experiment] = {
    "shapes_tiny": Experiment(shapes.shapes_tiny,
                              "tiny Transfusion on built-in 16 px shapes (CPU default)"),
    **_paper_entries(),
}


def get_config(name: str = "shapes_tiny"):
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    config = EXPERIMENTS[name].build()
    config.description = EXPERIMENTS[name].description
    return config
