"""Collect the final metrics of finished runs (one point per run) for scaling fits.

A run's workdir holds config.json (resolved config), metrics.jsonl (rows
{"step", "split": "train"|"eval", ...}) and optionally eval/*.json (held-out
evaluations written by the evaluation tools: flat {metric: number} objects), and
sweep_run.json (written by launch/sweep.py: experiment, family, overrides).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Iterable, Optional


from tfusion.eval.checkpoints import load_config
from tfusion.scaling import compute


def read_rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_values(rows: Iterable[dict], split: str) -> dict:
    """The last logged value of every numeric metric of one split ("train", "eval")."""
    out = {}
    for row in rows:
        if row.get("split", "train") != split:
            continue
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                out[key] = float(value)
    return out


def last_step(rows: Iterable[dict]) -> int:
    return max((int(r["step"]) for r in rows if r.get("split", "train") == "train"), default=0)


def train_seconds(rows: Iterable[dict]) -> float:
    """Seconds spent in train steps: each logged interval's mean step time times its
    steps (compilation, evaluations and checkpoints left out)."""
    total, previous = 0.0, 0
    for row in rows:
        if row.get("split", "train") == "train" and "step_s" in row:
            total += float(row["step_s"]) * (int(row["step"]) - previous)
            previous = int(row["step"])
    return total


def is_finished(workdir: str, steps: int) -> bool:
    """The run logged its last train step (the trainer always logs the final step)."""
    return last_step(read_rows(workdir)) >= steps


def read_eval_files(workdir: str) -> dict:
    """eval/NAME.json -> {"eval_NAME/metric": value} for every numeric value."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "eval", "*.json"))):
        stem = os.path.splitext(os.path.basename(path))[0]
        with open(path) as f:
            data = json.load(f)
        for key, value in data.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"eval_{stem}/{key}"] = float(value)
    return out


def read_sweep_run(workdir: str) -> dict:
    path = os.path.join(workdir, "sweep_run.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def default_family(config) -> str:
    return "chameleon" if compute.is_discrete(config.model) else "transfusion"


def collect_run(workdir: str, step_batches: Optional[Callable] = None) -> Optional[dict]:
    """One point: params N, tokens D, compute (6ND and exact), final metrics.

    `step_batches(config)` returns a few batches of the run's data; their mean
    exact FLOPs (tfusion.flops) times the steps is `flops_exact`. None: skipped.
    """
    rows = read_rows(workdir)
    if not rows or not os.path.exists(os.path.join(workdir, "config.json")):
        return None
    sweep = read_sweep_run(workdir)
    if sweep.get("program", "train") != "train":  # e.g. the sweep's image tokenizer
        return None
    config = load_config(workdir)
    steps = last_step(rows)
    n = compute.trained_params(config.model)
    d = steps * compute.tokens_per_step(config)
    metrics = {f"train/{k}": v for k, v in last_values(rows, "train").items()}
    metrics.update({f"eval/{k}": v for k, v in last_values(rows, "eval").items()})
    metrics.update(read_eval_files(workdir))
    # The end-of-run evaluation suite (train.final_eval_suite), flat: final/shapes/cider, ...
    final = last_values(rows, "final_eval")
    metrics.update({f"final/{k}": v for k, v in final.items()})
    exact = None
    if step_batches is not None:
        exact = steps * compute.measured_step_flops(config.model, step_batches(config))
    return dict(run=os.path.basename(os.path.normpath(workdir)),
                experiment=sweep.get("experiment", config.get("name", "")),
                family=sweep.get("family") or default_family(config),
                params=n, steps=steps, tokens=d, flops_6nd=6.0 * n * d, flops_exact=exact,
                train_seconds=train_seconds(rows), final_eval_seconds=final.get("seconds"),
                metrics=metrics)


def collect_sweep(sweep_dir: str, step_batches: Optional[Callable] = None) -> list[dict]:
    """Points of every run directory directly under `sweep_dir` that has logged metrics."""
    points = []
    for workdir in sorted(glob.glob(os.path.join(sweep_dir, "*", ""))):
        point = collect_run(workdir, step_batches)
        if point is not None:
            points.append(point)
    return points
