"""run_eval_suite end to end with stand-in samplers (no trained model needed).

A perfect sampler renders exactly what each prompt says and captions each real
image with its ground truth: every shapes score must be 1 and FID ~0. A noise
sampler must score near chance and have a large FID.
"""
import json
import os

import numpy as np
import pytest

from data_pipelines import shapes
from experiments.shapes import shapes_tiny
from tfusion.eval.references import heldout_references
from tfusion.eval.shapes_scoring import parse_caption
from tfusion.eval.suites import EvalOptions, run_eval_suite, scalar_metrics

PX = 16


def render_caption(caption: str) -> np.ndarray:
    specs = tuple(shapes.ShapeSpec(shape=min(c.shapes), color=c.color, size=min(c.sizes),
                                   row=c.cell[0], col=c.cell[1])
                  for c in parse_caption(caption))
    return shapes.render_scene(shapes.Scene(specs), PX).astype(np.float32) / 127.5 - 1.0


class PerfectSampler:
    def __init__(self, references):
        self.truth = {r.image.tobytes(): r.caption for r in references}

    def images(self, captions):
        return np.stack([render_caption(c) for c in captions])

    def captions(self, pixels):
        return [self.truth[p.tobytes()] for p in pixels]


class NoiseSampler:
    def images(self, captions):
        return np.random.default_rng(0).uniform(-1, 1, (len(captions), PX, PX, 3))

    def captions(self, pixels):
        return ["a large green triangle at the bottom right"] * len(pixels)


def block_colour_features(images):
    """Mean colour of each 4x4-pixel block: a cheap stand-in for the feature network."""
    n = len(images)
    return np.asarray(images).reshape(n, 4, PX // 4, 4, PX // 4, 3).mean(axis=(2, 4)).reshape(n, -1)


@pytest.fixture(scope="module")
def config():
    c = shapes_tiny()
    assert c.data.image_size == PX
    # Scenes of 1-3 shapes: the perfect captioner looks captions up by image bytes, and
    # one-shape scenes (the tiny default) repeat pixel-identical images too often.
    c.data.shapes_max_per_image = 3
    return c


OPTIONS = EvalOptions(shapes_prompts=48, fid_samples=64, grid_images=8, progress=False)


def test_perfect_sampler_scores_one_and_zero_fid(config, tmp_path):
    refs = heldout_references(config, OPTIONS.fid_samples)
    results = run_eval_suite("shapes", None, config, str(tmp_path), step=7, options=OPTIONS,
                             sampler=PerfectSampler(refs))
    shapes_result = results["shapes"]
    for part in ("generation", "captioning", "detector_on_real"):
        for key in ("color", "shape", "size", "position", "count", "exact"):
            assert shapes_result[part][key] == 1.0, (part, key)
    assert shapes_result["generation_chance"]["exact"] < 0.1
    saved = json.load(open(tmp_path / "eval" / "shapes.json"))
    assert saved["step"] == 7 and saved["metrics"]["generation"]["color"] == 1.0
    assert os.path.exists(tmp_path / "eval" / "shapes_generation_step7.png")
    assert os.path.exists(tmp_path / "eval" / "shapes_captions_step7.png")
    fid_result = run_eval_suite("fid", None, config, str(tmp_path), step=7, options=OPTIONS,
                                sampler=PerfectSampler(refs),
                                feature_fn=block_colour_features)["fid"]
    assert fid_result["fid"] < 1e-6
    assert fid_result["fid_real_train_vs_eval"] > fid_result["fid"]
    assert "shapes/generation/color" in scalar_metrics(results)


def test_noise_sampler_scores_near_chance(config, tmp_path):
    result = run_eval_suite("shapes", None, config, str(tmp_path), options=OPTIONS,
                            sampler=NoiseSampler())["shapes"]
    chance = result["generation_chance"]
    for key in ("color", "shape", "size", "position"):
        assert result["generation"][key] <= chance[key] + 0.1
    assert result["generation"]["exact"] == 0.0
    assert result["captioning"]["exact"] < 0.1
    fid_value = run_eval_suite("fid", None, config, str(tmp_path), options=OPTIONS,
                               sampler=NoiseSampler(),
                               feature_fn=block_colour_features)["fid"]["fid"]
    assert fid_value > 1.0


class _DigitSampler:
    """Returns a real held-out digit of the class each prompt names (`shift` = 0), or of
    the next class (`shift` = 1): the suite must read 100% vs ~0% as prompted."""

    def __init__(self, shift: int):
        from sklearn.datasets import load_digits
        from data_pipelines.builtin_text import digit_caption
        digits = load_digits()
        self.by_caption = {}
        for image, label in zip(digits.images[:256], digits.target[:256]):
            self.by_caption.setdefault(digit_caption((label - shift) % 10), image)

    def images(self, captions):
        grey = np.stack([self.by_caption[c] for c in captions]) / 8.0 - 1.0  # 0..16 -> [-1, 1]
        return np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)


@pytest.mark.parametrize("shift,expected", [(0, 1.0), (1, 0.0)])
def test_digits_suite_reads_generated_digits_with_a_real_classifier(tmp_path, shift, expected):
    from experiments.registry import get_config
    config = get_config("digits_tiny")
    config.data.image_size = 8
    result = run_eval_suite("digits", None, config, str(tmp_path), options=EvalOptions(
        digits_per_class=2, progress=False), sampler=_DigitSampler(shift))["digits"]
    assert result["classifier_heldout_accuracy"] > 0.95
    assert result["accuracy"] == pytest.approx(expected, abs=0.1)
    assert result["images"] == 20 and len(result["per_digit"]) == 10
