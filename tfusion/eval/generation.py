"""The two generation calls the eval suites need, on top of tfusion.inference.

  images(captions)  [BOS caption BOI] -> one image each (CFG as configured),
                    returned as pixels in [-1, 1];
  captions(pixels)  [BOS BOI image EOI] -> greedy text until EOS, decoded.

Suites take these as plain callables, so they can be tested with stand-ins (a
perfect renderer, a ground-truth captioner) and without a trained model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from data_pipelines import encoders

ImagesFn = Callable[[Sequence[str]], np.ndarray]
CaptionsFn = Callable[[np.ndarray], list]


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    batch_size: int = 16  # prompts per generate() call
    steps: Optional[int] = None  # diffusion steps; None = config.diffusion.sample_steps
    cfg_scale: Optional[float] = -1.0  # -1 = config.diffusion.cfg_scale; None = no CFG
    max_caption_tokens: int = 64
    seed: int = 0


def latents_to_pixels(latents: np.ndarray, config) -> np.ndarray:
    """Generated latents [N, H, W, C] (the discrete baseline: VQ codes [N, h, w, 1])
    -> pixels in [-1, 1] through the data encoder's decoder."""
    encoder = _encoder(config)
    if encoder.decode is None:
        raise NotImplementedError(f"encoder {config.data.encoder!r} has no decoder; image "
                                  "metrics need pixels")
    grid = encoder.latent_shape(config.data.image_size)
    pixels = np.stack([encoder.decode(np.reshape(x, grid)) for x in latents])
    return np.clip(np.asarray(pixels, np.float32), -1.0, 1.0)


def _encoder(config):
    return encoders.resolve(config.data.encoder, config.data.get("encoder_path", ""))


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class ModelSampler:
    """Image generation and captioning with one model through the inference engine."""

    def __init__(self, model, config, settings: SamplingSettings = SamplingSettings(),
                 progress=None, tokenizer=None):
        from data_pipelines import build_tokenizer
        from tfusion.inference.engine import Engine
        from tfusion.inference.options import GenerationOptions, SpecialTokens
        from tfusion.inference.samples import clip_for

        self.config, self.settings, self.progress = config, settings, progress
        self.tokenizer = tokenizer or build_tokenizer(config)
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        self.engine = Engine(model, config.diffusion)
        overrides = {} if settings.steps is None else {"steps": settings.steps}
        if settings.cfg_scale != -1.0:
            overrides["cfg_scale"] = settings.cfg_scale
        # Image prompts end in BOI: the image is the prompt's, no text after it.
        self.image_options = GenerationOptions.from_config(
            config, max_new_tokens=0, max_images=0, clip_denoised=clip_for(config), **overrides)
        self.caption_options = GenerationOptions.from_config(
            config, max_new_tokens=settings.max_caption_tokens, max_images=0, temperature=0.0,
            cfg_scale=None)

    def _generate(self, prompts, options, first_seed: int):
        from tfusion.inference.generate import generate

        seeds = [self.settings.seed + first_seed + i for i in range(len(prompts))]
        return generate(self.engine, prompts, self.special, options, seeds)

    def images(self, captions: Sequence[str]) -> np.ndarray:
        from tfusion.inference.samples import text_to_image_prompt

        prompts = [text_to_image_prompt(self.tokenizer, c) for c in captions]
        latents = []
        for start, stop in self._progress(_batches(len(prompts), self.settings.batch_size),
                                          len(prompts), "generating images"):
            for g in self._generate(prompts[start:stop], self.image_options, start):
                latents.append(g.images[0])
        return latents_to_pixels(np.stack(latents), self.config)

    def captions(self, pixels: np.ndarray) -> list[str]:
        s = self.special
        encode = _encoder(self.config).encode
        prompts = [[np.asarray([s.bos, s.boi], np.int32), encode(p)] for p in pixels]
        out = []
        for start, stop in self._progress(_batches(len(prompts), self.settings.batch_size),
                                          len(prompts), "captioning"):
            for g in self._generate(prompts[start:stop], self.caption_options, start):
                # Generation.tokens holds the appended EOI first; decode() drops specials.
                out.append(self.tokenizer.decode(g.tokens.tolist()))
        return out

    def _progress(self, iterable, total: int, desc: str):
        if self.progress is None:
            return iterable
        return self.progress(iterable, total=-(-total // self.settings.batch_size), desc=desc)
