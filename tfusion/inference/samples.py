"""Sample grids for a run: what the trainer writes to workdir/samples/ every
train.sample_every steps, and what launch/generate.py uses to save images."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from flax import nnx

from tfusion.inference.engine import Engine
from tfusion.inference.generate import generate
from tfusion.inference.options import GenerationOptions, SpecialTokens


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
    from tfusion.eval.generation import latents_to_pixels
    from tfusion.eval.grid import write_grid

    engine = Engine(as_model(model_or_params), config.diffusion)
    overrides = dict(max_new_tokens=0, max_images=0, clip_denoised=clip_for(config))
    if steps is not None:
        overrides["steps"] = steps
    if cfg_scale != -1.0:
        overrides["cfg_scale"] = cfg_scale
    options = GenerationOptions.from_config(config, **overrides)
    special = SpecialTokens.from_tokenizer(tokenizer)
    latents = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        outs = generate(engine, [text_to_image_prompt(tokenizer, c) for c in chunk], special,
                        options, seeds=[seed + start + i for i in range(len(chunk))])
        latents.extend(g.images[0] for g in outs)
    write_grid(out_path, latents_to_pixels(np.stack(latents), config), list(prompts),
               columns=min(8, len(prompts)))
    with open(os.path.splitext(out_path)[0] + ".txt", "w") as f:
        f.write("\n".join(prompts) + "\n")
    return out_path
