"""Run outputs: metrics.jsonl (one object per logged step), TensorBoard, console lines.

Only the primary process writes; the others get a writer that drops everything,
so callers never branch on the process index.
"""
from __future__ import annotations

import json
import logging
import os

_log = logging.getLogger("tfusion.train")

# Console line: these keys in this order, when present.
CONSOLE_KEYS = ("loss", "loss_lm", "loss_diffusion", "grad_norm", "lr", "tokens_per_s", "mfu",
                "step_s", "skipped_total", "perplexity", "denoise_skill_mean",
                "image_caption_gap", "caption_image_gap")

# Cumulative data counters from the input pipeline (tfusion/train/feed.py):
# data_records_read, data_skipped_<reason>, data_repaired_<reason>, and per source of
# the mixture data_<name>_records_read, data_<name>_skipped_<reason>,
# data_<name>_unreadable_shards, data_<name>_truncated_shards.
DATA_PREFIX = "data_"
_READ_SUFFIX = "_records_read"


def _by_reason(counts: dict, kind: str) -> dict:
    prefix = f"{DATA_PREFIX}{kind}_"
    return {k[len(prefix):]: int(v) for k, v in counts.items() if k.startswith(prefix) and v}


def data_summary(counts: dict) -> str:
    """"records read 1,200; skipped 360 (corrupt_image 350, empty_caption 10); repaired
    12 (grayscale_to_rgb 12)": the part of a console line a user scans for lost data."""
    parts = [f"records read {int(counts.get(DATA_PREFIX + 'records_read', 0)):,}"]
    for kind in ("skipped", "repaired"):
        reasons = _by_reason(counts, kind)
        if reasons:
            detail = ", ".join(f"{r} {n:,}" for r, n in sorted(reasons.items(),
                                                                key=lambda kv: -kv[1]))
            parts.append(f"{kind} {sum(reasons.values()):,} ({detail})")
        else:
            parts.append(f"{kind} 0")
    deferred = int(counts.get(DATA_PREFIX + "deferred_image_capacity", 0))
    if deferred:
        parts.append(f"rows deferred for image capacity {deferred:,}")
    sources = sorted(k[len(DATA_PREFIX):-len(_READ_SUFFIX)] for k in counts
                     if k.startswith(DATA_PREFIX) and k.endswith(_READ_SUFFIX)
                     and k != DATA_PREFIX + "records_read")
    if sources:
        parts.append("per source: " + ", ".join(_source_summary(counts, s) for s in sources))
    return "; ".join(parts)


def _source_summary(counts: dict, source: str) -> str:
    """"web 800 read, 12 skipped, 1 shard unreadable"."""
    prefix = f"{DATA_PREFIX}{source}_"
    skipped = sum(int(v) for k, v in counts.items() if k.startswith(prefix + "skipped_"))
    text = f"{source} {int(counts[prefix + 'records_read']):,} read, {skipped:,} skipped"
    for kind in ("unreadable", "truncated"):
        n = int(counts.get(f"{prefix}{kind}_shards", 0))
        if n:
            text += f", {n} shard{'s' if n > 1 else ''} {kind}"
    return text


def _format(key: str, value) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key}={value:.2e}"
        if key == "mfu":
            return f"{key}={100 * value:.1f}%"
        if key == "tokens_per_s":
            return f"{key}={value:,.0f}"
        return f"{key}={value:.4f}"
    return f"{key}={value}"


def console_line(step: int, total: int, metrics: dict, prefix: str = "train") -> str:
    parts = [_format(k, metrics[k]) for k in CONSOLE_KEYS if k in metrics]
    line = f"[{prefix} {step}/{total}] " + " ".join(parts)
    if any(k.startswith(DATA_PREFIX) for k in metrics):
        line += " | data: " + data_summary(metrics)
    return line


def _drop_rows_after(path: str, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint; drop their old rows so
    metrics.jsonl holds each step once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        _drop_rows_after(path, resume_step)
        self._jsonl = open(path, "a")
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        """One JSON object {"step", "split", **metrics}; TensorBoard scalars prefix/key."""
        if not self.enabled:
            return
        row = {"step": int(step), "split": prefix}
        row.update({k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{prefix}/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def write_config(workdir: str, config) -> None:
    """The resolved config (every default filled in) as workdir/config.json."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
