"""Generate from a trained run: text -> image (and text after it), or image -> caption.

  python -m launch.generate --workdir=DIR --prompt="a red circle" --out=OUT_DIR
      [--image=PATH] [--num_samples=N --cfg_scale=S --steps=K --seed=X]
      [--max_new_tokens=T --max_images=I --temperature=... --top_k=... --top_p=...]
      [--params=ema|raw --attention_kernel=xla|flash|auto]

Without --image the prompt is `BOS prompt BOI`: an image first, then text until EOS
or --max_new_tokens. With --image it is `BOS BOI image EOI prompt`: text about the
image (a caption when --prompt is empty). With --image and --edit it is
`BOS BOI image EOI prompt BOI`: the image edited as the prompt instructs (a run
fine-tuned on edits, e.g. shapes_edit_tiny; docs/editing.md), guided on the
instruction alone by default (--edit_guidance). Writes OUT_DIR/sample_<i>_image_<j>.png
and OUT_DIR/sample_<i>.txt (the interleaved output, images as <image: file>).
A missing run, checkpoint, tokenizer or unreadable --image exits with one
`error: ...` line on stderr.

The params (never the optimizer state) are restored sharded on a mesh of all devices
shaped by the run's config.mesh, and sampling runs on that mesh. Several processes
(a pod slice: start it on every host, as launch.train) each take part; the primary
writes the files.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from launch import sampling_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/).",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "", "Text prompt (caption, or text after --image).")
_IMAGE = flags.DEFINE_string("image", None, "Image to caption (any PIL-readable file).")
_MODE = flags.DEFINE_enum("mode", "image", ["image", "text"],
                          "image: the prompt is a caption and an image follows (BOS caption "
                          "BOI), or with --image the image then the text; text: BOS prompt, "
                          "continued as text (an LM's greedy continuation with --temperature=0).")
_EDIT = flags.DEFINE_bool("edit", False, "With --image: edit the image as --prompt says "
                         "(BOS BOI image EOI prompt BOI); writes the edited image.")
_EDIT_GUIDANCE = flags.DEFINE_enum(
    "edit_guidance", "instruction", ["instruction", "all", "none"],
    "--edit: CFG against the image without the instruction (instruction), against a bare "
    "BOS BOI (all), or off (none).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
_PARAMS = flags.DEFINE_enum("params", "ema", ["ema", "raw"],
                            "ema: the run's EMA of the parameters (raw where it kept none).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples (seeds seed .. seed+N-1).")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None,
                                "CFG scale; default config.diffusion.cfg_scale; 0 = no CFG.")
_STEPS = flags.DEFINE_integer("steps", None, "Diffusion steps; default config's sample_steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of sample 0.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Sampled tokens per sample.")
_MAX_IMAGES = flags.DEFINE_integer("max_images", 0, "Images the model may start itself.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Samples per generate() call.")
_ATTENTION_KERNEL = flags.DEFINE_string(
    "attention_kernel", None, "Attention kernel for sampling (tfusion/config.py "
    "ATTENTION_KERNELS: xla, flash, auto, ...); default: the run's model.attention_kernel.")


class ImageInputError(ValueError):
    """--image is missing or not a decodable image."""


def read_image_latent(config, image_path: str):
    """--image as the run's latent (its data.image_size, through its encoder)."""
    from data_pipelines import encoders
    from data_pipelines.images import prepare_image
    from data_pipelines.records import BadRecord

    try:
        with open(image_path, "rb") as f:
            pixels, _ = prepare_image(f.read(), config.data.image_size)
    except OSError as e:
        raise ImageInputError(f"cannot read --image {image_path}: {e.strerror or e}") from e
    except BadRecord as e:
        raise ImageInputError(f"--image {image_path}: {e}") from e
    encoder = encoders.resolve(config.data.encoder, config.data.get("encoder_path", ""))
    return encoder.encode(pixels)


def build_prompt(tokenizer, config, text: str, image_path: str | None, mode: str = "image",
                 edit: bool = False) -> list:
    import numpy as np

    from tfusion.inference.model_sampler import edit_position, edit_prompt, text_to_image_prompt

    if edit and image_path is None:
        raise ImageInputError("--edit needs --image (the image to edit)")
    if mode == "text" and image_path is None:
        return [np.asarray([tokenizer.bos_id] + tokenizer.encode(text), np.int32)]
    if image_path is None:
        return text_to_image_prompt(tokenizer, text)
    latent = read_image_latent(config, image_path)
    if edit:
        return edit_prompt(tokenizer, latent, text, edit_position(config))
    s = tokenizer
    return [np.asarray([s.bos_id, s.boi_id], np.int32), latent,
            np.asarray([s.eoi_id] + tokenizer.encode(text), np.int32)]


def write_outputs(out_dir: str, first: int, generations, tokenizer, config) -> list[str]:
    """PNG per image and the interleaved text per sample; returns the text files."""
    from PIL import Image

    from tfusion.inference.model_sampler import latents_to_pixels
    from tfusion.inference.model_sampler import to_uint8

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for i, g in enumerate(generations, start=first):
        parts, n_images, tokens = [], 0, []
        for seg in g.segments:
            if seg.ndim == 3:
                name = f"sample_{i}_image_{n_images}.png"
                pixels = latents_to_pixels(seg[None], config)[0]
                Image.fromarray(to_uint8(pixels)).save(os.path.join(out_dir, name))
                parts.append(f"<image: {name}>")
                n_images += 1
            else:
                parts.append(tokenizer.decode(seg.tolist()))
                tokens.append([int(t) for t in seg])
        path = os.path.join(out_dir, f"sample_{i}.txt")
        with open(path, "w") as f:
            f.write(" ".join(p for p in parts if p) + "\n")
        with open(os.path.join(out_dir, f"sample_{i}.json"), "w") as f:
            json.dump({"token_segments": tokens, "images": n_images}, f)  # sampled ids, exactly
        written.append(path)
    return written


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from tfusion.train import distributed

    # Several processes (TFUSION_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID, a
    # SLURM job, a TPU slice) share one mesh; otherwise this stays single-process.
    distributed.initialize()

    from tqdm import tqdm

    from data_pipelines import build_tokenizer
    from tfusion.config import ConfigError
    from tfusion.eval.checkpoints import (RunNotFoundError, load_config, load_model,
                                          override_attention_kernel)
    from tfusion.inference.generate import generate
    from tfusion.inference.options import GenerationOptions, SpecialTokens
    from tfusion.inference.model_sampler import clip_for, edit_prompt, sharded_engine

    try:
        config = load_config(_WORKDIR.value)
        override_attention_kernel(config, _ATTENTION_KERNEL.value)
        sampling_flags.apply_to(config)
        model, config, step = load_model(_WORKDIR.value, _STEP.value, config,
                                         params=_PARAMS.value)
        tokenizer = build_tokenizer(config)
        prompt = build_prompt(tokenizer, config, _PROMPT.value, _IMAGE.value, _MODE.value,
                              edit=_EDIT.value)
    except (RunNotFoundError, ConfigError, ImageInputError) as e:
        sys.exit(f"error: {e}")  # the user's input is wrong: one line, no traceback
    edit = _EDIT.value
    overrides = dict(max_new_tokens=0 if edit else _MAX_NEW_TOKENS.value,
                     max_images=0 if edit else _MAX_IMAGES.value,
                     temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                     clip_denoised=clip_for(config))
    if _CFG_SCALE.value is not None:
        overrides["cfg_scale"] = _CFG_SCALE.value or None
    if _STEPS.value is not None:
        overrides["steps"] = _STEPS.value
    if edit and _EDIT_GUIDANCE.value == "none":
        overrides["cfg_scale"] = None
    options = GenerationOptions.from_config(config, **overrides)
    twin = None  # --edit guided on the instruction: the image without it (model_sampler)
    if edit and _EDIT_GUIDANCE.value == "instruction" and options.cfg_scale is not None:
        twin = edit_prompt(tokenizer, prompt[1], None)  # the same for either position
    engine = sharded_engine(model, config)
    primary = jax.process_index() == 0
    special = SpecialTokens.from_tokenizer(tokenizer)
    progress = lambda n: tqdm(total=n, desc="diffusion", leave=False)
    n, size = _NUM_SAMPLES.value, _BATCH_SIZE.value
    if primary:
        print(f"checkpoint step {step}; {n} sample(s); attention "
              f"{config.model.attention_kernel}; {options}")
    for start in range(0, n, size):
        count = min(size, n - start)
        seeds = [_SEED.value + start + i for i in range(count)]
        outs = generate(engine, [prompt] * count, special, options, seeds,
                        progress=progress if primary else None,
                        uncond_prompts=None if twin is None else [twin] * count)
        if not primary:
            continue
        for path in write_outputs(_OUT.value, start, outs, tokenizer, config):
            with open(path) as f:
                print(f"{path}: {f.read().strip()}")


if __name__ == "__main__":
    app.run(main)
