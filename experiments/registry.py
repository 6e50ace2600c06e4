"""Experiment registry: `--config=experiments/registry.py:NAME` resolves NAME here.

Each entry is a builder and a one-line description. `get_config(name)` is what
ml_collections' config_flags calls. Entries are generated from small tables
(paper sizes, patch sizes, ablations, micro sizes); see docs/experiments.md.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple

# config_flags loads this file by path; make the repo importable from it.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from experiments import ablations, autoencoders, chameleon, micro, paper, shapes  # noqa: E402
from tfusion.train.validate import validate_image_representation  # noqa: E402


class Experiment(NamedTuple):
    build: Callable
    description: str


def _named(name: str, build: Callable) -> Callable:
    def named_build():
        config = build()
        config.name = name
        return config
    return named_build


def _transfusion_entries() -> dict[str, Experiment]:
    out = {}
    for size in paper.PAPER_SIZES:
        for layer in paper.MODALITY_LAYERS:
            for k in paper.PATCH_SIZES:
                out[f"transfusion_{size}_{layer}_p{k}"] = Experiment(
                    lambda s=size, m=layer, p=k: paper.paper_config(s, m, p),
                    f"Transfusion {size}, {layer} modality layers, patch {k}, paper recipe")
        # The paper's main setting under a short name.
        out[f"transfusion_{size}"] = Experiment(
            _named(f"transfusion_{size}", lambda s=size: paper.paper_config(s)),
            f"Transfusion {size}, linear patch 2 (the paper's main setting)")
    return out


def _chameleon_entries() -> dict[str, Experiment]:
    return {f"chameleon_{size}": Experiment(
        _named(f"chameleon_{size}",
               lambda s=size: chameleon.make_discrete(paper.paper_config(s))),
        f"Chameleon-style baseline {size}: VQ image tokens (16384 codes, 1024/image), "
        "LM loss on all tokens, QK-norm, z-loss 1e-5") for size in paper.PAPER_SIZES}


def _ablation_entries() -> dict[str, Experiment]:
    size = ablations.ABLATION_SIZE
    out = {}
    for suffix, (description, overrides) in ablations.ABLATIONS.items():
        name = f"transfusion_{size}_{suffix}"
        out[name] = Experiment(
            _named(name, lambda o=overrides: ablations.apply_overrides(
                paper.paper_config(size), o)),
            f"ablation at {size}: {description}")
    return out


def _micro_entries() -> dict[str, Experiment]:
    out = {}
    for family in micro.FAMILIES:
        for size, (depth, width, _) in micro.MICRO_SIZES.items():
            out[f"micro_{family}_{size}"] = Experiment(
                lambda f=family, s=size: micro.micro_config(f, s),
                f"CPU micro {family} on shapes: {depth} layers x width {width}, "
                f"{micro.MICRO_STEPS} steps")
            out[f"repro_{family}_{size}"] = Experiment(
                lambda f=family, s=size: micro.reproduction_config(f, s),
                f"CPU micro reproduction {family} on shapes: {depth} layers x width "
                f"{width}, {micro.REPRO_STEPS} steps, scored by the `all` suite")
    return out


EXPERIMENTS: dict[str, Experiment] = {
    "shapes_tiny": Experiment(shapes.shapes_tiny,
                              "tiny Transfusion on built-in 16 px shapes (CPU default)"),
    "shapes_tiny_quick": Experiment(shapes.shapes_tiny_quick,
                                    "shapes_tiny with 2 rows per step on caption -> image "
                                    "pairs only, for budgets of minutes (quality per "
                                    "CPU-minute)"),
    "shapes_edit_tiny": Experiment(shapes.shapes_edit_tiny,
                                   "image editing: a finished shapes_tiny run fine-tuned on "
                                   "shapes_edit (train.init_from the README workdir)"),
    **_transfusion_entries(),
    **_chameleon_entries(),
    **_ablation_entries(),
    **_micro_entries(),
    "digits_tiny": Experiment(shapes.digits_tiny,
                              "tiny Transfusion on the bundled 8x8 handwritten digits (CPU)"),
    "vae_shapes_tiny": Experiment(autoencoders.vae_shapes_tiny,
                                  "f4c4 VAE on 32 px shapes (launch.train_autoencoder)"),
    "vq_shapes_tiny": Experiment(autoencoders.vq_shapes_tiny,
                                 "f4 VQ-VAE, 256 codes, 32 px shapes (launch.train_autoencoder)"),
    "vq_shapes_micro": Experiment(autoencoders.vq_shapes_micro,
                                  "f4 VQ-VAE, 256 codes, 16 px shapes: the micro Chameleon "
                                  "runs' image tokenizer (launch.train_autoencoder)"),
}


def get_config(name: str = "shapes_tiny"):
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    config = EXPERIMENTS[name].build()
    config.description = EXPERIMENTS[name].description
    validate_image_representation(config)
    return config
