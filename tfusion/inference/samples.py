"""Sample grids for a run: what the trainer writes to workdir/samples/ every
train.sample_every steps, and what launch/generate.py uses to save images."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from flax import nnx

from tfusion.inference.options import SpecialTokens


def as_model(model_or_params):
    """An nnx model from a model or a (graphdef, params) pair (params: State or pure dict)."""
    if isinstance(model_or_params, nnx.Module):
        return model_or_params
    graphdef, params = model_or_params
    return nnx.merge(graphdef, params)


def clip_for(config) -> float | None:
    """Pixel latents (identity encoder) live in [-1, 1]: clip predicted x0 there."""
    data = config.get("data")
    return 1.0 if data is not None and data.get("encoder") == "identity" else None


def text_to_image_prompt(tokenizer, caption: str) -> list:
    special = SpecialTokens.from_tokenizer(tokenizer)
    return [np.asarray([special.bos] + tokenizer.encode(caption) + [special.boi], np.int32)]


def write_sample_grid(model_or_params, config, tokenizer, prompts: Sequence[str],
                      out_path: str, seed: int = 0, *, steps: int | None = None,
                      cfg_scale: float | None = -1.0, batch_size: int = 8) -> str:
    """One image per caption in `prompts` ([BOS caption BOI], CFG as configured),
    as a PNG grid at out_path with each caption under its image, plus the captions
    in out_path's .txt sibling. Returns out_path.

    steps None = config.diffusion.sample_steps; cfg_scale -1 = config's, None = off.
    Image i uses seed + i, so a grid is reproducible and independent of batch_size.
    """
    from tfusion.eval.generation import ModelSampler, SamplingSettings
    from tfusion.eval.grid import write_grid

    settings = SamplingSettings(batch_size=batch_size, steps=steps, cfg_scale=cfg_scale,
                                seed=seed)
    sampler = ModelSampler(as_model(model_or_params), config, settings, tokenizer=tokenizer)
    write_grid(out_path, sampler.images(list(prompts)), list(prompts),
               columns=min(8, len(prompts)))
    with open(os.path.splitext(out_path)[0] + ".txt", "w") as f:
        f.write("\n".join(prompts) + "\n")
    return out_path
