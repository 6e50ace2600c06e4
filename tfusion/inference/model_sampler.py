"""Images from captions and captions from images with one model, and PNG grids of them.

  ModelSampler.images(captions)  [BOS caption BOI] -> one image each (CFG as configured),
                                 as pixels in [-1, 1] through the image codec's decoder;
  ModelSampler.captions(pixels)  [BOS BOI image EOI] -> greedy text until EOS, decoded;
  ModelSampler.edits(pixels, instructions)
                                 [BOS BOI image EOI instruction BOI] -> the edited image,
                                 guided on the instruction (EDIT_GUIDANCE);
  write_sample_grid              what the trainer writes every train.sample_every steps;
  sharded_engine                 the inference Engine on the mesh the params lie on.

Sampling runs where the params are: a model whose params are sharded on a mesh (the
training mesh, or load_model's) samples on that mesh with the run's rule table, and in
a multi-process run every process takes part (each runs the same host loop; only the
primary writes files). Nothing gathers the params to one host.

The eval suites take images/captions as plain callables, so they can be tested with
stand-ins (a perfect renderer, a ground-truth captioner) and without a trained model.
"""
from __future__ import annotations

import dataclasses
import os
import textwrap
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from PIL import Image, ImageDraw, ImageFont

from tfusion.autoencoders.image_codec import image_codec
from tfusion.inference.engine import Engine
from tfusion.inference.generate import generate
from tfusion.inference.options import GenerationOptions, SpecialTokens
from tfusion.sharding import mesh_rules

ImagesFn = Callable[[Sequence[str]], np.ndarray]
# What an edit's CFG contrasts the prompt with (docs/editing.md):
#   "instruction"  the same input image without the instruction, BOS BOI <input> EOI
#                  BOI (InstructPix2Pix's text term; trained by edit_instruction_dropout);
#   "all"          a bare BOS BOI (no image, no instruction: what caption dropout trains);
#   "none"         no guidance.
EDIT_GUIDANCE = ("instruction", "all", "none")
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
    return image_codec(config.data.encoder, config.data.get("encoder_path", ""))


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class ModelSampler:
    """Image generation and captioning with one model through the inference engine."""

    def __init__(self, model, config, tokenizer, settings: SamplingSettings = SamplingSettings(),
                 progress=None):
        self.config, self.settings, self.progress = config, settings, progress
        self.tokenizer = tokenizer
        self.special = SpecialTokens.from_tokenizer(self.tokenizer)
        self.engine = sharded_engine(model, config)
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
        seeds = [self.settings.seed + first_seed + i for i in range(len(prompts))]
        return generate(self.engine, prompts, self.special, options, seeds)

    def images(self, captions: Sequence[str]) -> np.ndarray:
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

    def edits(self, pixels: np.ndarray, instructions: Sequence[str],
              guidance: str = "instruction") -> np.ndarray:
        """The input images [N, H, W, 3] in [-1, 1] edited as instructed, as pixels."""
        if guidance not in EDIT_GUIDANCE:
            raise ValueError(f"unknown edit guidance {guidance!r}; choose from {EDIT_GUIDANCE}")
        if len(pixels) != len(instructions):
            raise ValueError(f"{len(pixels)} images but {len(instructions)} instructions")
        s = self.special
        encode = _encoder(self.config).encode
        inputs = [encode(p) for p in pixels]
        position = edit_position(self.config)
        prompts = [edit_prompt(self.tokenizer, x, text, position)
                   for x, text in zip(inputs, instructions)]
        twins = [edit_prompt(self.tokenizer, x, None) for x in inputs]
        options = self.image_options
        if guidance == "none":
            options = dataclasses.replace(options, cfg_scale=None)
        latents = []
        for start, stop in self._progress(_batches(len(prompts), self.settings.batch_size),
                                          len(prompts), "editing images"):
            uncond = twins[start:stop] if guidance == "instruction" else None
            seeds = [self.settings.seed + start + i for i in range(stop - start)]
            for g in generate(self.engine, prompts[start:stop], s, options, seeds,
                              uncond_prompts=uncond):
                latents.append(g.images[0])
        return latents_to_pixels(np.stack(latents), self.config)

    def _progress(self, iterable, total: int, desc: str):
        if self.progress is None:
            return iterable
        return self.progress(iterable, total=-(-total // self.settings.batch_size), desc=desc)


def params_mesh(model) -> Optional[jax.sharding.Mesh]:
    """The mesh a model's params are sharded on (None: not on a mesh, e.g. created
    eagerly on the default device)."""
    for leaf in jax.tree.leaves(nnx.state(model)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def sharded_engine(model, config) -> Engine:
    """An Engine on the mesh the model's params lie on, activations and caches placed
    by the run's rule table (config.mesh.rule_overrides); without a mesh, the default
    device. `config.model.attention_kernel` is the model's own (set when it was built)."""
    mesh_cfg = config.get("mesh")
    table = None if mesh_cfg is None else mesh_rules(mesh_cfg)
    return Engine(model, config.diffusion, mesh=params_mesh(model), table=table)


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


def edit_prompt(tokenizer, latent: np.ndarray, instruction: str | None,
                position: str = "after_input") -> list:
    """The edit document's prefix (data_pipelines/documents.py): BOS BOI <latent> EOI
    instruction BOI, or with position "before_input" BOS instruction BOI <latent> EOI
    BOI; no instruction (None): BOS BOI <latent> EOI BOI."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    words = tokenizer.encode(instruction) if instruction is not None else []
    before, after = (words, []) if position == "before_input" else ([], words)
    return [np.asarray([special.bos] + before + [special.boi], np.int32),
            np.asarray(latent, np.float32),
            np.asarray([special.eoi] + after + [special.boi], np.int32)]


def edit_position(config) -> str:
    """Where the run's edit documents put the instruction (data.edit_instruction_position)."""
    return config.data.get("edit_instruction_position", "after_input")


def write_sample_grid(model_or_params, config, tokenizer, prompts: Sequence[str],
                      out_path: str, seed: int = 0, *, steps: int | None = None,
                      cfg_scale: float | None = -1.0, batch_size: int = 8) -> str:
    """One image per caption in `prompts` ([BOS caption BOI], CFG as configured),
    as a PNG grid at out_path with each caption under its image, plus the captions
    in out_path's .txt sibling. Returns out_path.

    steps None = config.diffusion.sample_steps; cfg_scale -1 = config's, None = off.
    Image i uses seed + i, so a grid is reproducible and independent of batch_size
    and of the mesh. With params sharded over processes every process must call it
    (the sampling is collective); the primary process writes the files.
    """
    settings = SamplingSettings(batch_size=batch_size, steps=steps, cfg_scale=cfg_scale,
                                seed=seed)
    sampler = ModelSampler(as_model(model_or_params), config, tokenizer, settings)
    images = sampler.images(list(prompts))
    if jax.process_index() == 0:
        write_grid(out_path, images, list(prompts), columns=min(8, len(prompts)))
        with open(os.path.splitext(out_path)[0] + ".txt", "w") as f:
            f.write("\n".join(prompts) + "\n")
    return out_path


# --- PNG grids ---

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
