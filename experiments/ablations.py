"""The paper's ablations (Section 4.3) as changes to one base experiment.

Each entry: suffix -> (description, {dotted config field: value}). The base is
the 0.76B linear patch-2 model, the size the paper ablates at.
"""
from __future__ import annotations

ABLATION_SIZE = "0.76B"
NOISE_OFF_T = 999  # noise_limit_t = T - 1: image-first pairs get the full schedule

ABLATIONS = {
    "causal": ("causal attention among an image's patches (paper: bidirectional)",
               {"model.image_attention": "causal"}),
    "no_noise_limit": ("no noise limiting for image-first pairs (t up to T-1)",
                       {"diffusion.noise_limit_t": NOISE_OFF_T}),
    "lambda1": ("diffusion loss weight lambda = 1 (paper: 5)", {"diffusion.loss_weight": 1.0}),
    "lambda2": ("diffusion loss weight lambda = 2 (paper: 5)", {"diffusion.loss_weight": 2.0}),
    "lambda10": ("diffusion loss weight lambda = 10 (paper: 5)",
                 {"diffusion.loss_weight": 10.0}),
    "cfg0": ("no caption dropout for CFG (default 0.1)", {"diffusion.cfg_dropout": 0.0}),
    "cfg0.2": ("caption dropout 0.2 for CFG (default 0.1)", {"diffusion.cfg_dropout": 0.2}),
}


def apply_overrides(config, overrides: dict):
    """Sets dotted fields ("model.image_attention") on a ConfigDict, in place."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"config has no field {dotted!r}")
        node[leaf] = value
    return config
