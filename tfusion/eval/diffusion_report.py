"""The diffusion-recipe ablation report: one row per run of a sweep (generation and
captioning scores from the run's final evaluation, denoising skill and cross-modal
gaps from its last held-out evaluation, wall time from its metrics), a markdown
table, a JSON file and the denoising-skill curves on one plot.

  python -m launch.sweep --sweep=diffusion_ablation --workdir=DIR   (writes DIR/report)
"""
from __future__ import annotations

import json
import os

from tfusion.scaling.collect import last_values, read_rows

SCORES = (("generation", ("color", "shape", "position", "count")),
          ("captioning", ("color", "shape", "position", "count")))


def run_row(name: str, run_dir: str, description: str = "") -> dict | None:
    """The numbers of one finished run (None while it has no final evaluation)."""
    rows = read_rows(run_dir)
    final = last_values(rows, "final_eval")
    if not final:
        return None
    evals = last_values(rows, "eval")
    train = [r for r in rows if r.get("split") == "train"]
    skill = {float(k.split("/f")[1]): v for k, v in evals.items()
             if k.startswith("denoise_skill/")}
    log_snr = {float(k.split("/f")[1]): v for k, v in evals.items() if k.startswith("log_snr/")}
    suite = next((s for s in ("shapes", "digits") if any(k.startswith(s + "/") for k in final)),
                 "")
    out = {"run": name, "description": description, "suite": suite,
           "scores": {k[len(suite) + 1:]: v for k, v in final.items() if k.startswith(suite + "/")
                      and "_shapes/" not in k and "chance" not in k and "detector" not in k},
           "denoise_skill": dict(sorted(skill.items())),
           "log_snr": dict(sorted(log_snr.items())),
           "denoise_skill_mean": evals.get("denoise_skill_mean"),
           "image_caption_gap": evals.get("image_caption_gap"),
           "caption_image_gap": evals.get("caption_image_gap"),
           "final_eval_seconds": final.get("seconds")}
    # Wall time of the training steps: step_s is the mean over each logged interval.
    if train:
        steps = [r["step"] for r in train]
        intervals = [b - a for a, b in zip([0] + steps[:-1], steps)]
        out["train_seconds"] = float(sum(r.get("step_s", 0.0) * n
                                         for r, n in zip(train, intervals)))
        out["steps"] = steps[-1]
    return out


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown_table(rows: list[dict]) -> str:
    head = ["run", "what"]
    for kind, attrs in SCORES:
        head += [f"{kind[:3]} {a}" for a in attrs]
    head += ["skill mean", "skill t=0.95", "img|cap gap", "cap|img gap", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["scores"]
        cells = [r["run"], r["description"]]
        for kind, attrs in SCORES:
            cells += [_fmt(s.get(f"{kind}/{a}")) for a in attrs]
        top = r["denoise_skill"].get(0.95)
        cells += [_fmt(r["denoise_skill_mean"]), _fmt(top), _fmt(r["image_caption_gap"]),
                  _fmt(r["caption_image_gap"]), f"{r.get('train_seconds', 0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_skill(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, r in enumerate(rows):
        fr = sorted(r["denoise_skill"])
        # log-SNR on the x axis: comparable across processes and schedules.
        xs = [r["log_snr"].get(f, float("nan")) for f in fr]
        ax.plot(xs, [r["denoise_skill"][f] for f in fr], marker="o", ms=3, label=r["run"],
                color=f"C{i % 10}", ls="-" if i < 10 else "--")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("log SNR of the noise level (left: pure noise, right: nearly clean)")
    ax.set_ylabel("x0 error / data-mean predictor's")
    ax.set_title("denoising skill by noise level (held-out shapes)")
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs: list[tuple[str, str, str]], out_dir: str) -> list[dict]:
    """runs: (name, run_dir, description). Writes table.md, results.json, skill.png."""
    rows = [r for r in (run_row(*run) for run in runs) if r is not None]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(markdown_table(rows))
    if rows:
        plot_skill(rows, os.path.join(out_dir, "skill.png"))
    return rows
