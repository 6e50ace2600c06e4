"""Report of the micro reproduction sweep: the paper's findings measured at micro scale.

Input: the points of `tfusion.scaling.collect` (one per run; `family` says what a run is:
"transfusion" / "chameleon" = the scaling comparison, "<family>_seed<k>" = extra seeds,
"ablation_<name>" = one change to the Transfusion run at the ablation size). Each run's
final evaluation (suite "all", metrics.jsonl split "final_eval") gives the image metrics.

Output (out_dir): the scaling report (tfusion.scaling.report: fits per family and metric,
parity FLOP ratios, one plot per metric) over the headline metrics, and
reproduction.md / reproduction.json: the runs with their cost, the seed spread, and each
of the paper's claims beside what the sweep measured.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from tfusion.scaling import report as report_lib

FAMILIES = ("transfusion", "chameleon")
# The shapes suite's attributes (tfusion.eval.shapes_scoring.ATTRIBUTES), named here so
# that reading a report does not import the shapes dataset; a test checks they agree.
SHAPES_ATTRIBUTES = ("color", "shape", "size", "position")


class Metric(NamedTuple):
    label: str
    higher_is_better: bool


# Every metric is measured the same way for both families (samples or held-out captions).
HEADLINE = {
    "eval/loss_text": Metric("held-out caption NLL (nats)", False),
    "final/generation_error": Metric("generation error, 1 - mean attribute accuracy", False),
    "final/captioning_error": Metric("captioning error, 1 - mean attribute accuracy", False),
    "final/fid": Metric("FID (shapes feature net)", False),
    "final/cider": Metric("CIDEr of captions (x100)", True),
}


class Claim(NamedTuple):
    name: str
    base: str  # run whose setting is the paper's (the one expected to be better)...
    variant: str  # ...against the changed run
    metric: str
    paper: str  # what the paper measured
    expect_base_better: bool  # the paper's direction


CLAIMS = (
    Claim("bidirectional vs causal attention inside an image", "transfusion_w128",
          "ablation_causal", "final/fid",
          "FID 61.3 causal -> 20.3 bidirectional (0.76B, linear 2x2; Table 5)", True),
    Claim("bidirectional vs causal attention inside an image", "transfusion_w128",
          "ablation_causal", "final/generation_error", "(same ablation)", True),
    Claim("noise limiting of image-first pairs (captioning)", "transfusion_w128",
          "ablation_no_noise_limit", "final/cider",
          "CIDEr 25.4 without -> 29.4 with noise limiting (Table 8)", True),
    Claim("noise limiting of image-first pairs (captioning)", "transfusion_w128",
          "ablation_no_noise_limit", "final/captioning_error", "(same ablation)", True),
    Claim("U-Net vs linear modality layers", "ablation_unet", "transfusion_w128",
          "final/fid", "U-Net better than linear, most at small sizes (Table 7)", True),
    Claim("patch 2 vs patch 4 (linear, 512-token rows)", "ablation_patch2", "ablation_patch4",
          "final/fid", "image quality falls as a linear patch grows (Table 6)", True),
    Claim("patch 1 vs patch 2 (linear, 512-token rows)", "ablation_patch1", "ablation_patch2",
          "final/fid", "(same table)", True),
)
PAPER_PARITY = {"final/fid": "0.029 (FID, Table 3)"}


def headline_values(metrics: dict) -> dict:
    """The HEADLINE metrics of one run from its logged metrics (missing ones left out)."""
    out = {}
    if "eval/loss_text" in metrics:
        out["eval/loss_text"] = metrics["eval/loss_text"]
    for task in ("generation", "captioning"):
        scores = [metrics.get(f"final/shapes/{task}/{a}") for a in SHAPES_ATTRIBUTES]
        if all(s is not None for s in scores):
            out[f"final/{task}_error"] = 1.0 - float(np.mean(scores))
    if "final/fid/fid" in metrics:
        out["final/fid"] = metrics["final/fid/fid"]
    if "final/shapes/cider" in metrics:
        out["final/cider"] = metrics["final/shapes/cider"]
    return out


def _by_run(points: list[dict]) -> dict:
    return {p["run"]: p for p in points}


def seed_spread(points: list[dict], family: str) -> dict:
    """max - min of each headline metric over the runs of `family` at the ablation size
    with different seeds (the seed-0 run is the one without a suffix)."""
    runs = _by_run(points)
    seeds = [p for p in points if p["family"].startswith(f"{family}_seed")]
    out = {}
    for extra in seeds:
        base = runs.get(extra["run"].rsplit("_seed", 1)[0])
        if base is None:
            continue
        for m, v in extra["headline"].items():
            if m in base["headline"]:
                out[m] = max(out.get(m, 0.0), abs(v - base["headline"][m]))
    return out


def judge(claim: Claim, points: list[dict], spread: dict) -> dict:
    runs = _by_run(points)
    base, variant = runs.get(claim.base), runs.get(claim.variant)
    row = claim._asdict()
    if base is None or variant is None or claim.metric not in base["headline"] \
            or claim.metric not in variant["headline"]:
        return dict(row, verdict="not measured (a run is missing)")
    b, v = base["headline"][claim.metric], variant["headline"][claim.metric]
    better = (b > v) if HEADLINE[claim.metric].higher_is_better else (b < v)
    noise = spread.get(claim.metric)
    if noise is not None and abs(b - v) <= noise:
        verdict = "inside the seed spread"
    elif better == claim.expect_base_better:
        verdict = "same direction as the paper"
    else:
        verdict = "opposite to the paper"
    return dict(row, base_value=b, variant_value=v, seed_spread=noise, verdict=verdict)


def _fmt(x, digits=4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _run_cost(point: dict) -> dict:
    return {k: point.get(k) for k in ("train_seconds", "final_eval_seconds")}


def markdown(points, parity_rows, claims, spread) -> str:
    names = list(HEADLINE)
    lines = ["## Runs", "", "| run | family | params | 6ND FLOPs | exact FLOPs | train s | "
             "eval s | " + " | ".join(names) + " |", "|" + "---|" * (7 + len(names))]
    for p in points:
        lines.append(f"| {p['run']} | {p['family']} | {p['params']:,} | {p['flops_6nd']:.3e} "
                     f"| {_fmt(p['flops_exact'])} | {_fmt(p.get('train_seconds'))} | "
                     f"{_fmt(p.get('final_eval_seconds'))} | "
                     + " | ".join(_fmt(p["headline"].get(m)) for m in names) + " |")
    lines += ["", "## Parity FLOP ratio (Transfusion's compute to match the baseline's value "
              "at the baseline's largest run; < 1: Transfusion needs less)", "",
              "| metric | ratio | paper |", "|---|---|---|"]
    for r in parity_rows:
        lines.append(f"| {r['metric']} | {_fmt(r['ratio'], 3)} | "
                     f"{PAPER_PARITY.get(r['metric'], '-')} |")
    lines += ["", "## Seed spread at the ablation size (|seed 0 - seed 1|)", "",
              "| metric | transfusion | chameleon |", "|---|---|---|"]
    chameleon_spread = seed_spread(points, "chameleon")
    for m in names:
        lines.append(f"| {m} | {_fmt(spread.get(m))} | {_fmt(chameleon_spread.get(m))} |")
    lines += ["", "## The paper's claims", "",
              "| claim | metric | paper | expected better | its value | other | seed spread "
              "| verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        lines.append(f"| {c['name']} | {c['metric']} | {c['paper']} | {c['base']} | "
                     f"{_fmt(c.get('base_value'))} | {c['variant']}: "
                     f"{_fmt(c.get('variant_value'))} | {_fmt(c.get('seed_spread'))} | "
                     f"{c['verdict']} |")
    return "\n".join(lines) + "\n"


def write(points: list[dict], out_dir: str, compute_key: str = "flops_6nd") -> dict:
    """points: collect.collect_sweep's, each with train_seconds / final_eval_seconds
    where known. Writes the scaling report of the two families and reproduction.md/json."""
    os.makedirs(out_dir, exist_ok=True)
    for p in points:
        p["headline"] = headline_values(p["metrics"])
        p["metrics"].update(p["headline"])
    scaling = [p for p in points if p["family"] in FAMILIES]
    result = report_lib.write_report(scaling, out_dir, compute_key, metrics=list(HEADLINE))
    spread = seed_spread(points, "transfusion")
    claims = [judge(c, points, spread) for c in CLAIMS]
    out = dict(runs=[dict(run=p["run"], family=p["family"], params=p["params"],
                          tokens=p["tokens"], flops_6nd=p["flops_6nd"],
                          flops_exact=p["flops_exact"], headline=p["headline"], **_run_cost(p))
                     for p in points],
               parity=result["parity"], seed_spread=spread, claims=claims)
    with open(os.path.join(out_dir, "reproduction.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(out_dir, "reproduction.md"), "w") as f:
        f.write(markdown(points, result["parity"], claims, spread))
    return out
