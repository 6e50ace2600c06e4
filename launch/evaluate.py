"""Evaluate a trained run.

  python -m launch.evaluate --workdir=/tmp/run --suite=all [--step=N]
      [--shapes_prompts=64 --fid_samples=256 --sample_steps=50 --cfg_scale=3
       --sampler=dpmpp_2m --spacing=trailing --cfg_interval=0.2,1 ...]

Suites: text (perplexity, diffusion loss at fixed t), shapes (compositional
generation + captioning scores on the built-in shapes data), fid, all. Writes
workdir/eval/<suite>.json (+ .jsonl history) and samples grids. See
docs/evaluation.md. A missing run or checkpoint exits with one `error: ...` line on
stderr.

The params (never the optimizer state) are restored sharded on a mesh of all devices
shaped by the run's config.mesh; generation and the held-out passes run on it.
--attention_kernel=xla|flash|auto overrides the run's model.attention_kernel.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags

from launch import sampling_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/).",
                               required=True)
_SUITE = flags.DEFINE_enum("suite", "all", ["text", "shapes", "fid", "digits", "edit", "all"],
                           "What to evaluate.")
_EDIT_PROMPTS = flags.DEFINE_integer("edit_prompts", 100,
                                     "edit: held-out edits scored (the kinds in turn).")
_EDIT_GUIDANCE = flags.DEFINE_enum("edit_guidance", "instruction", ["instruction", "all", "none"],
                                   "edit: what CFG contrasts the edit prompt with "
                                   "(tfusion/inference/model_sampler.py EDIT_GUIDANCE).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
_PARAMS = flags.DEFINE_enum("params", "ema", ["ema", "raw"],
                            "ema: the run's EMA of the parameters (raw where it kept none).")
_SHAPES_PROMPTS = flags.DEFINE_integer("shapes_prompts", 64, "shapes: held-out prompts/images.")
_FID_SAMPLES = flags.DEFINE_integer("fid_samples", 256, "fid: images per set.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", None,
                                     "Diffusion steps; default config.diffusion.sample_steps.")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None,
                                "CFG scale; default config.diffusion.cfg_scale; 0 = no CFG.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Prompts per generation batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_FID_FEATURES = flags.DEFINE_string("fid_features", "",
                                    "shapes FID feature network (.npz); default: the cache.")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Hide progress bars.")
_ATTENTION_KERNEL = flags.DEFINE_string(
    "attention_kernel", None, "Attention kernel (tfusion/config.py ATTENTION_KERNELS: xla, "
    "flash, auto, ...); default: the run's model.attention_kernel.")


def _current_defaults():
    """The run's experiment as the code defines it now (fills fields added since)."""
    from experiments import registry
    from tfusion.eval.checkpoints import load_config

    name = load_config(_WORKDIR.value).get("name", "")
    return registry.get_config(name) if name in registry.EXPERIMENTS else None


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("tfusion").setLevel(logging.INFO)
    import jax

    from tfusion.train import distributed

    # Several processes (TFUSION_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID, a
    # SLURM job, a TPU slice) share one mesh; otherwise this stays single-process.
    distributed.initialize()

    from tfusion.config import ConfigError
    from tfusion.eval.checkpoints import (RunNotFoundError, load_config, load_model,
                                          override_attention_kernel)
    from tfusion.inference.model_sampler import SamplingSettings
    from tfusion.eval.suites import EvalOptions, run_eval_suite, scalar_metrics

    cfg_scale = -1.0 if _CFG_SCALE.value is None else (_CFG_SCALE.value or None)
    options = EvalOptions(
        shapes_prompts=_SHAPES_PROMPTS.value, fid_samples=_FID_SAMPLES.value,
        sampling=SamplingSettings(batch_size=_BATCH_SIZE.value, steps=_SAMPLE_STEPS.value,
                                  cfg_scale=cfg_scale, seed=_SEED.value),
        fid_features=_FID_FEATURES.value, progress=not _NO_PROGRESS.value,
        edit_prompts=_EDIT_PROMPTS.value, edit_guidance=_EDIT_GUIDANCE.value)
    try:
        config = load_config(_WORKDIR.value, _current_defaults())
        override_attention_kernel(config, _ATTENTION_KERNEL.value)
        sampling_flags.apply_to(config)
        model, config, step = load_model(_WORKDIR.value, _STEP.value, config,
                                         params=_PARAMS.value)
        results = run_eval_suite(_SUITE.value, model, config, _WORKDIR.value, step,
                                 options=options)
    except (RunNotFoundError, ConfigError) as e:  # e.g. the run's tokenizer file is gone
        sys.exit(f"error: {e}")  # the user's input is wrong: one line, no traceback
    if jax.process_index() != 0:
        return
    for name, value in sorted(scalar_metrics(results).items()):
        print(f"{name:50s} {value:.4f}")


def run() -> None:
    """Console script `tfusion-evaluate`."""
    app.run(main)


if __name__ == "__main__":
    run()
