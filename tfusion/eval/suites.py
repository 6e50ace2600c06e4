"""Evaluation suites by name; `run_eval_suite` is what launch/evaluate.py calls, and
`suite_evaluator` wraps it as the trainer's final evaluation (launch/train_setup.py).

  text    held-out perplexity (clean images) + diffusion loss at fixed t
  shapes  `shapes` only: compositional generation scores (detector on generated
          images vs. the prompt), captioning scores (parsed captions vs. ground
          truth) and CIDEr; samples grids
  fid     FID of generated vs. held-out real images (shapes feature net by
          default; any feature_fn for other data, e.g. Inception)
  edit    `shapes_edit` only: held-out (scene, instruction) edits, the detector reads
          each edited image against the target scene (eval/edit_scoring.py): exact,
          edited, preserved, per kind; references (target, input, another scene)
          scored alike; a grid of input | output | target
  digits  `digits` only: a classifier trained on the real training digits reads the
          images generated for "a handwritten digit <d>"; accuracy = read as prompted
  all     every suite that applies to the data

Results go to workdir/eval/<suite>.json (latest) and <suite>.jsonl (history).

The model's params stay where they are (the training mesh, or load_model's): sampling
and the held-out passes run sharded on that mesh. In a multi-process run every
process calls run_eval_suite (each takes part in every computation and gets the same
metrics); only the primary process writes files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx

from data_pipelines.builtin_text import digit_caption
from data_pipelines.pipeline import make_eval_iterator
from data_pipelines.shapes import render_scene
from data_pipelines.shapes_edit import make_edit
from data_pipelines.tokenizer import build_tokenizer
from tfusion.eval import fid as fid_lib
from tfusion.eval.cider import cider_d
from tfusion.eval.edit_scoring import aggregate_edits, score_edit
from tfusion.eval.heldout import heldout_metrics
from tfusion.eval.references import heldout_references
from tfusion.eval.shapes_detector import detect_batch
from tfusion.eval.suite_sources import (SHAPES_WORLD, SUITE_HELDOUT_RECORDS, SUITES, applies,
                                        source_problem)
from tfusion.eval.shapes_scoring import Claim, aggregate, parse_caption, score_image
from tfusion.inference.model_sampler import ModelSampler, SamplingSettings, write_grid

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    # held-out captions generated and images captioned
    shapes_prompts: int = SUITE_HELDOUT_RECORDS["shapes"]
    fid_samples: int = SUITE_HELDOUT_RECORDS["fid"]  # generated and real images per FID set
    sampling: SamplingSettings = SamplingSettings()
    fid_features: str = ""  # shapes feature-net file; "" = the cache (trained if missing)
    grid_images: int = 32  # images shown per samples grid
    digits_per_class: int = 10  # digits: images generated per digit 0..9
    progress: bool = True  # tqdm bars (generation, held-out batches)
    edit_prompts: int = 100  # edit: held-out edits (kinds in turn: 20 of each kind)
    edit_guidance: str = "instruction"  # edit: model_sampler.EDIT_GUIDANCE


class _Context:
    """What suites in one call share: the model, references, generated images."""

    def __init__(self, model, config, workdir, step, options, sampler, feature_fn):
        self.model, self.config, self.workdir = model, config, workdir
        self.step, self.options = step, options
        self.progress = _tqdm if options.progress else None
        self._sampler, self._feature_fn = sampler, feature_fn
        self._references: list = []
        self._generated = np.zeros((0,), np.float32)

    @property
    def sampler(self):
        if self._sampler is None:
            self._sampler = ModelSampler(self.model, self.config, build_tokenizer(self.config),
                                         self.options.sampling, self.progress)
        return self._sampler

    def references(self, count: int) -> list:
        if len(self._references) < count:
            self._references = heldout_references(self.config, count)
        return self._references[:count]

    def generated(self, count: int) -> np.ndarray:
        """Images for the first `count` held-out captions, generated once per call."""
        have = len(self._generated)
        if have < count:
            captions = [r.caption for r in self.references(count)[have:]]
            new = np.asarray(self.sampler.images(captions), np.float32)
            self._generated = new if have == 0 else np.concatenate([self._generated, new])
        return self._generated[:count]

    def feature_fn(self):
        if self._feature_fn is None:
            if self.config.data.source not in SHAPES_WORLD:
                raise ValueError("fid: pass feature_fn (e.g. Inception) for data.source="
                                 f"{self.config.data.source!r}; see docs/evaluation.md")
            from tfusion.eval.fid_features import shapes_feature_fn
            self._feature_fn = shapes_feature_fn(self.config.data.image_size,
                                                 self.options.fid_features)
        return self._feature_fn

    def path(self, name: str) -> str:
        tag = "" if self.step is None else f"_step{self.step}"
        return os.path.join(self.workdir, "eval", f"{name}{tag}.png")


def _tqdm(iterable=None, **kwargs):
    from tqdm.auto import tqdm
    return tqdm(iterable, leave=False, **kwargs)


def text_suite(ctx: _Context) -> dict:
    batches = make_eval_iterator(ctx.config)
    progress = None
    if ctx.progress:
        progress = lambda it: ctx.progress(it, total=ctx.config.data.eval_batches,
                                           desc="held-out batches")
    return heldout_metrics(ctx.model, batches, ctx.config, seed=ctx.config.train.seed,
                           progress=progress)


def _require_source(ctx: _Context, suite: str) -> None:
    problem = source_problem(suite, ctx.config.data.source)
    if problem:
        raise ValueError(problem)


def _claims(detections) -> list:
    return [Claim.from_detection(d) for d in detections]


def shapes_suite(ctx: _Context) -> dict:
    _require_source(ctx, "shapes")
    refs = ctx.references(ctx.options.shapes_prompts)
    stated = [[Claim.from_spec(a) for a in r.attributes] for r in refs]
    counts = [len(s) for s in stated]
    real = np.stack([r.image for r in refs])
    real_found = detect_batch(real)
    generated = ctx.generated(len(refs))
    gen_found = detect_batch(generated)
    captions = ctx.sampler.captions(real)
    shown = ctx.options.grid_images
    write_grid_file(ctx.path("shapes_generation"), generated[:shown],
               [r.caption for r in refs[:shown]])
    write_grid_file(ctx.path("shapes_captions"), real[:shown], captions[:shown])
    return {
        "generation": aggregate([score_image(s, _claims(d)) for s, d in zip(stated, gen_found)],
                                counts),
        "captioning": aggregate([score_image(s, parse_caption(c))
                                 for s, c in zip(stated, captions)], counts),
        "cider": cider_d(captions, [[r.caption] for r in refs])["cider"],
        # Chance level: each prompt scored against the image of another held-out scene.
        "generation_chance": aggregate(score_image(s, _claims(d)) for s, d in
                                       zip(stated, real_found[1:] + real_found[:1])),
        # Guards: the detector must read the real images perfectly; at low resolution
        # some shapes are pixel-identical, and shape scores are upper bounds there.
        "detector_on_real": aggregate(score_image(s, _claims(d))
                                      for s, d in zip(stated, real_found)),
        "shape_ambiguous_fraction": float(np.mean(
            [len(d.shapes) > 1 for found in real_found for d in found])),
        # The best expected captioning shape accuracy: a pixel-identical pair can only be
        # guessed (shapes are drawn uniformly), so 1 / candidates per object.
        "captioning_shape_ceiling": float(np.mean(
            [1.0 / len(d.shapes) for found in real_found for d in found])),
        "samples": {"caption_examples": [{"reference": r.caption, "generated": c}
                                         for r, c in zip(refs[:8], captions[:8])]},
    }


def edit_suite(ctx: _Context) -> dict:
    _require_source(ctx, "edit")
    d = ctx.config.data
    edits = [make_edit("eval", i, d.edit_max_shapes) for i in range(ctx.options.edit_prompts)]
    to_pixels = lambda scenes: np.stack([render_scene(x, d.image_size) for x in scenes]
                                        ).astype(np.float32) / 127.5 - 1.0
    inputs, targets = to_pixels([e.source for e in edits]), to_pixels([e.target for e in edits])
    outputs = np.asarray(ctx.sampler.edits(inputs, [e.instruction for e in edits],
                                           ctx.options.edit_guidance), np.float32)

    def scored(images):
        return aggregate_edits(edits, [score_edit(e, _claims(found)) for e, found in
                                       zip(edits, detect_batch(images))])

    shown = min(ctx.options.grid_images, len(edits))
    triples = np.stack([inputs[:shown], outputs[:shown], targets[:shown]], axis=1)
    texts = [[e.instruction, "output", "target"] for e in edits[:shown]]
    write_grid_file(ctx.path("edit_grid"), triples.reshape((-1,) + inputs.shape[1:]),
                    [t for row in texts for t in row], columns=6)
    return {
        "scores": scored(outputs),
        "guidance": ctx.options.edit_guidance,
        # References through the same detector and scorer: the target rendered (a
        # perfect editor), the input unchanged, and another held-out edit's target.
        "perfect_editor": scored(targets)["all"],
        "identity_editor": scored(inputs)["all"],
        "other_scene": scored(np.roll(targets, 1, axis=0))["all"],
        "examples": [{"instruction": e.instruction, "input": e.source.caption(),
                      "target": e.target.caption()} for e in edits[:8]],
    }


def fid_suite(ctx: _Context) -> dict:
    n = ctx.options.fid_samples
    feature_fn = ctx.feature_fn()
    batch = 64
    split = lambda images: (images[i:i + batch] for i in range(0, len(images), batch))
    real = np.stack([r.image for r in ctx.references(n)])
    generated = ctx.generated(n)
    train_real = np.stack([r.image for r in heldout_references(ctx.config, n, split="train")])
    real_stats = fid_lib.stats_of_images(split(real), feature_fn)
    shown = ctx.options.grid_images
    write_grid_file(ctx.path("fid_samples"), generated[:shown],
               [r.caption for r in ctx.references(shown)])
    return {
        "fid": fid_lib.frechet_distance(fid_lib.stats_of_images(split(generated), feature_fn),
                                        real_stats),
        # Floor at this sample size: real training images vs. the held-out ones.
        "fid_real_train_vs_eval": fid_lib.frechet_distance(
            fid_lib.stats_of_images(split(train_real), feature_fn), real_stats),
        "samples": n,
    }


def _digit_classifier(config):
    """(classifier on 8x8 intensities 0..16, held-out accuracy): an RBF SVM on the real
    training digits, the split the data pipeline trains on (the first
    data.eval_examples records are held out)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    n_eval = config.data.eval_examples
    x, y = digits.images.reshape(len(digits.images), -1), digits.target
    classifier = SVC(gamma=0.001, C=10.0).fit(x[n_eval:], y[n_eval:])
    return classifier, float(np.mean(classifier.predict(x[:n_eval]) == y[:n_eval]))


def _as_digit_intensities(pixels: np.ndarray) -> np.ndarray:
    """Generated RGB pixels [N, H, W, 3] in [-1, 1] -> [N, 64] grey intensities 0..16 at
    8x8 (the sklearn set's resolution; larger images are area-averaged)."""
    grey = np.mean(np.asarray(pixels, np.float64), axis=-1)
    n, h, w = grey.shape
    if h % 8 or w % 8:
        raise ValueError(f"digits: image size {h}x{w} is not a multiple of 8")
    grey = grey.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return ((grey + 1.0) * 8.0).reshape(n, 64)


def digits_suite(ctx: _Context) -> dict:
    _require_source(ctx, "digits")
    classifier, heldout_accuracy = _digit_classifier(ctx.config)
    wanted = [d for d in range(10) for _ in range(ctx.options.digits_per_class)]
    prompts = [digit_caption(d) for d in wanted]
    generated = np.asarray(ctx.sampler.images(prompts), np.float32)
    read = classifier.predict(_as_digit_intensities(generated))
    correct = read == np.asarray(wanted)
    order = np.argsort(np.arange(len(wanted)) % ctx.options.digits_per_class, kind="stable")
    shown = order[:min(ctx.options.grid_images, len(order))]  # one of each digit first
    write_grid_file(ctx.path("digits_generation"), generated[shown],
               [f"{prompts[i]} (read: {read[i]})" for i in shown], columns=10)
    return {
        "accuracy": float(np.mean(correct)),
        "per_digit": {str(d): float(np.mean(correct[np.asarray(wanted) == d])) for d in range(10)},
        "classifier_heldout_accuracy": heldout_accuracy,
        "images": len(wanted),
    }


SUITE_FNS: dict[str, Callable[[_Context], dict]] = {
    "text": text_suite, "shapes": shapes_suite, "fid": fid_suite, "digits": digits_suite,
    "edit": edit_suite}


def suites_for(name: str, config) -> tuple[str, ...]:
    if name == "all":  # fid on other data: pass a feature_fn and run suite "fid"
        return tuple(s for s in SUITES if applies(s, config.data.source))
    if name not in SUITE_FNS:
        raise ValueError(f"unknown suite {name!r}; choose from {SUITES + ('all',)}")
    return (name,)


def as_model(model_or_params, config) -> nnx.Module:
    """An nnx model, or the trainer's params (a pure dict, merged with the graphdef
    where they lie: sharded params stay sharded). None passes through (suites that
    only use an injected sampler need no model)."""
    if model_or_params is None or isinstance(model_or_params, nnx.Module):
        return model_or_params
    from tfusion.train.params import abstract_model
    graphdef, _ = abstract_model(config.model)
    return nnx.merge(graphdef, model_or_params)


def is_primary() -> bool:
    """The process that writes files (every process computes)."""
    return jax.process_index() == 0


def write_grid_file(path: str, images, texts, **kwargs) -> None:
    if is_primary():
        write_grid(path, images, texts, **kwargs)


def write_result(workdir: str, name: str, result: dict) -> str:
    """workdir/eval/<name>.json and a line of <name>.jsonl (the primary process only);
    returns the .json path."""
    directory = os.path.join(workdir, "eval")
    if not is_primary():
        return os.path.join(directory, f"{name}.json")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    with open(os.path.join(directory, f"{name}.jsonl"), "a") as f:
        f.write(json.dumps(result, sort_keys=True) + "\n")
    return path


def scalar_metrics(result: dict, prefix: str = "") -> dict[str, float]:
    """Nested suite metrics -> flat {"shapes/generation/color": 0.9, ...} numbers (for
    metrics.jsonl / TensorBoard); lists and strings are left out."""
    flat = {}
    for key, value in result.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(scalar_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def run_eval_suite(name: str, model_or_params, config, workdir: str,
                   step: Optional[int] = None, *, options: EvalOptions = EvalOptions(),
                   sampler=None, feature_fn=None) -> dict:
    """Runs suite `name` ("text", "shapes", "fid" or "all") and writes its JSON.

    model_or_params: an nnx Transfusion model or the train state's params dict.
    sampler: object with .images(captions) -> pixels [N, H, W, 3] in [-1, 1] and
      .captions(pixels) -> list[str]; default: the model through tfusion.inference.
    feature_fn: FID features, images [N, H, W, 3] in [-1, 1] -> [N, D]; default: the
      shapes feature network (data.source == "shapes" only).
    Returns {suite: metrics} for every suite run.
    """
    names = suites_for(name, config)
    ctx = _Context(as_model(model_or_params, config), config, workdir, step, options,
                   sampler, feature_fn)
    results = {}
    for suite in names:
        start = time.perf_counter()
        metrics = SUITE_FNS[suite](ctx)
        result = {"suite": suite, "step": step, "metrics": metrics,
                  "seconds": time.perf_counter() - start}
        write_result(workdir, suite, result)
        _log.info("eval %s at step %s: %s", suite, step, json.dumps(scalar_metrics(metrics)))
        results[suite] = metrics
    if name == "all":
        write_result(workdir, "all", {"suite": "all", "step": step, "metrics": results})
    return results


def suite_evaluator(name: str, config, workdir: str, *,
                    options: EvalOptions = EvalOptions()) -> Callable[[int, object], dict]:
    """Suite `name` as a callable (step, model_or_params) -> flat scalar metrics: the
    trainer's `final_eval` (it logs them; the suite writes workdir/eval/ as usual)."""
    suites_for(name, config)  # an unknown name fails now, not at the end of training

    def evaluate(step: int, model_or_params) -> dict:
        return scalar_metrics(run_eval_suite(name, model_or_params, config, workdir, step,
                                             options=options))
    return evaluate
