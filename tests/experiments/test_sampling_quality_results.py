"""The committed steps-to-quality results (benchmarks/sampling_quality.py): one row per
(sampler, spacing, steps, guidance interval) with the keys the issue asks for, the
250-step DDPM reference, and shapes_tiny's default sampling measured there and within
the reference's seed spread at <= 1/8 of its time."""
import json
import os

import pytest

from experiments import registry
from tests.helpers import REPO_ROOT

RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results", "sampling_quality.json")
KEYS = {"sampler", "steps", "generation_mean", "seed_spread", "fid", "image_s", "cfg_interval",
        "spacing", "pixel_rmse_to_scene", "ode_error"}


def _rows():
    with open(RESULTS) as f:
        return json.load(f)["rows"]


@pytest.mark.results
def test_rows_have_the_keys_and_the_reference():
    rows = _rows()
    assert all(KEYS <= set(r) for r in rows)
    keys = [(r["sampler"], r["spacing"], r["steps"], tuple(r["cfg_interval"])) for r in rows]
    assert len(keys) == len(set(keys))
    steps = {r["steps"] for r in rows if r["sampler"] == "dpmpp_2m"}
    assert {250, 100, 50, 25, 15, 10, 5} <= steps
    assert ("ddpm", "linspace", 250, (0.0, 1.0)) in keys


@pytest.mark.results
def test_the_tiny_default_is_a_measured_row_that_meets_the_target():
    d = registry.get_config("shapes_tiny").diffusion
    rows = {(r["sampler"], r["spacing"], r["steps"], tuple(r["cfg_interval"])): r for r in _rows()}
    ref = rows[("ddpm", "linspace", 250, (0.0, 1.0))]
    default = rows[(d.sampler, d.sample_spacing, d.sample_steps, tuple(d.cfg_interval))]
    assert d.sample_steps <= 25
    assert abs(default["generation_mean"] - ref["generation_mean"]) <= max(
        ref["seed_spread"], default["seed_spread"])
    assert default["image_s_cpu_s"] <= ref["image_s_cpu_s"] / 8
