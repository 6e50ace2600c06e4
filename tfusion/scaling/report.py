"""Scaling report of collected points: fits per (family, metric), parity, table, plots.

Writes into `out_dir`: points.json, fits.json (laws, R^2, parity rows), table.md,
and one PNG per metric (`<metric with / as _>.png`).
"""
from __future__ import annotations

import json
import math
import os

from tfusion.scaling import fit as fit_lib, parity, plots

# Metrics fitted when present: final train losses and held-out ones. Evaluation
# files add their own (eval_<name>/<metric>), picked up by the "eval" prefix.
# eval/loss_text (plain NLL of text pairs) is the one both families share; the image
# terms differ by family (diffusion MSE vs NLL of VQ codes).
DEFAULT_METRICS = ("train/loss_lm", "train/loss_diffusion", "eval/loss_lm",
                   "eval/loss_diffusion", "eval/loss_text", "eval/loss_image_tokens")
# Metrics that measure the same thing in both families, so a parity ratio means
# something: loss_lm does not (the discrete baseline's covers image codes too).
CROSS_FAMILY_METRICS = ("eval/loss_text",)


def comparable_across_families(metric: str) -> bool:
    """eval/loss_text, evaluation files (eval_<name>/...: perplexity, FID, CIDEr) and
    the end-of-run suite's scores (final/...)."""
    return metric in CROSS_FAMILY_METRICS or metric.startswith(("eval_", "final/"))


def metrics_of(points: list[dict]) -> list[str]:
    found = {m for p in points for m in p["metrics"]}
    picked = [m for m in DEFAULT_METRICS if m in found]
    return picked + sorted(m for m in found if m.startswith("eval_"))


def fit_all(points: list[dict], metrics: list[str], compute_key: str = "flops_6nd",
            irreducible: bool = False) -> dict:
    """{(family, metric): {"law", "r2", "points", "max_compute"}} for every fittable pair."""
    fits = {}
    for family in sorted({p["family"] for p in points}):
        for metric in metrics:
            mine = [p for p in points if p["family"] == family and metric in p["metrics"]
                    and p.get(compute_key) and p["metrics"][metric] > 0]
            if len({p[compute_key] for p in mine}) < (4 if irreducible else 2):
                continue
            xs = [p[compute_key] for p in mine]
            ys = [p["metrics"][metric] for p in mine]
            law = fit_lib.fit_power_law(xs, ys, irreducible)
            fits[(family, metric)] = dict(law=law, r2=fit_lib.r_squared(law, xs, ys),
                                          points=len(mine), max_compute=max(xs))
    return fits


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def markdown_table(points: list[dict], fits: dict, parity_rows: list[dict],
                   compute_key: str, metric_names: list[str]) -> str:
    lines = ["## Runs", "", "| run | family | params | tokens | 6ND FLOPs | exact FLOPs | "
             + " | ".join(metric_names) + " |"]
    lines.append("|" + "---|" * (6 + len(metric_names)))
    for p in points:
        lines.append(f"| {p['run']} | {p['family']} | {p['params']:,} | {p['tokens']:,} | "
                     f"{p['flops_6nd']:.3e} | {_fmt(p['flops_exact'])} | "
                     + " | ".join(_fmt(p["metrics"].get(m)) for m in metric_names) + " |")
    lines += ["", f"## Fits: L = a * C^-b + c (C = {compute_key})", "",
              "| family | metric | a | b | c | R^2 (log) | points |", "|---|---|---|---|---|---|---|"]
    for (family, metric), f in sorted(fits.items()):
        law = f["law"]
        lines.append(f"| {family} | {metric} | {law.a:.4g} | {law.b:.4f} | {law.c:.4g} | "
                     f"{f['r2']:.4f} | {f['points']} |")
    if parity_rows:
        lines += ["", "## Parity FLOP ratio C_A / C_B (A matches B's metric at B's largest "
                      "compute)", "", "| metric | A | B | C_B | ratio |", "|---|---|---|---|---|"]
        for r in parity_rows:
            lines.append(f"| {r['metric']} | {r['family_a']} | {r['family_b']} | "
                         f"{r['compute_b']:.3e} | {_fmt(r['ratio'])} |")
    return "\n".join(lines) + "\n"


def write_report(points: list[dict], out_dir: str, compute_key: str = "flops_6nd",
                 irreducible: bool = False, families=("transfusion", "chameleon"),
                 metrics: list[str] | None = None) -> dict:
    """metrics: the ones to fit and plot (default: metrics_of(points))."""
    os.makedirs(out_dir, exist_ok=True)
    metrics = metrics or metrics_of(points)
    fits = fit_all(points, metrics, compute_key, irreducible)
    comparable = {k: v for k, v in fits.items() if comparable_across_families(k[1])}
    parity_rows = parity.parity_table(comparable, *families) if len(families) == 2 else []
    # inf: A never reaches B's value (B is below A's irreducible term); JSON has no inf.
    parity_rows = [dict(r, ratio=r["ratio"] if math.isfinite(r["ratio"]) else None)
                   for r in parity_rows]
    with open(os.path.join(out_dir, "points.json"), "w") as f:
        json.dump(points, f, indent=1)
    fits_json = [dict(family=fam, metric=m, law=v["law"].to_dict(), r2=v["r2"],
                      points=v["points"], max_compute=v["max_compute"])
                 for (fam, m), v in sorted(fits.items())]
    with open(os.path.join(out_dir, "fits.json"), "w") as f:
        json.dump(dict(compute=compute_key, fits=fits_json, parity=parity_rows), f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown_table(points, fits, parity_rows, compute_key, metrics))
    for metric in metrics:
        plots.plot_metric(points, fits, metric, compute_key,
                          os.path.join(out_dir, metric.replace("/", "_") + ".png"))
    return dict(fits=fits, parity=parity_rows)
