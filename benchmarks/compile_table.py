"""The AOT compile table of docs/experiments.md, generated from the result files.

    python benchmarks/compile_table.py [--results benchmarks/results/compile] \\
        [--doc docs/experiments.md]

Reads benchmarks/results/compile/ (written by `python -m launch.compile`):
  <experiment>_<topology>.json           the train step (the config's attention kernel)
  programs_<experiment>_<topology>.json  every program of a pod run, one entry each
and prints two markdown tables: per-device memory against the chip's capacity (and
the train step's FLOPs). With --doc, the text between the two marker lines in that
file is replaced; the rest of the doc is written by hand.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re

BEGIN = ("<!-- compile-table:begin (python benchmarks/compile_table.py --doc "
         "docs/experiments.md) -->")
END = "<!-- compile-table:end -->"
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile")
# launch/compile.py's programs, in the order a run meets them.
PROGRAMS = ("train", "eval", "eval_diagnostics", "decode", "diffusion_step", "diffusion_loop",
            "vae_decode")
SIZES = ("0.16B", "0.37B", "0.76B", "1.4B", "7B")


def size_of(experiment: str) -> str:
    """transfusion_7B -> 7B (the registry's names carry the size second)."""
    parts = experiment.split("_")
    return parts[1] if len(parts) > 1 else experiment


def _order(r: dict):
    size = size_of(r["experiment"])
    return (SIZES.index(size) if size in SIZES else len(SIZES), r["experiment"], r["topology"])


def load(results: str = RESULTS) -> tuple[list[dict], list[dict]]:
    """(train-step results, programs results), each sorted by model size."""
    train, programs = [], []
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        if os.path.basename(path).startswith("programs_"):
            programs.append(r)
        elif "experiment" in r and "per_device_memory_bytes" in r:
            train.append(r)
    return sorted(train, key=_order), sorted(programs, key=_order)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def train_table(train: list[dict]) -> list[str]:
    lines = ["| size | topology | mesh | kernel | per-device memory | capacity | "
             "compiled FLOPs/step | analytic (dense) | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in train:
        flops = r.get("compiled_flops")
        lines.append(" | ".join([
            f"| {size_of(r['experiment'])}", r["topology"], r["mesh_description"],
            r.get("attention_kernel", "xla"), gib(r["per_device_memory_bytes"]),
            gib(r["device_memory_capacity_bytes"]), f"{flops:.2e}" if flops else "-",
            f"{r['analytic_flops']:.2e}",
            f"{flops / r['analytic_flops']:.2f} |" if flops else "- |"]))
    return lines


def shapes(name: str, p: dict) -> str:
    if name in ("train", "eval") or name.startswith("eval_diagnostics"):
        return f"{p['rows']} rows x {p['seq_len']}"
    if name == "vae_decode":
        return f"{p['rows']} latents {'x'.join(map(str, p['latent']))} -> {p['image_size']} px"
    rows = f"{p['rows']} rows" + (f" ({p['prompts']} prompts, CFG)" if p.get("cfg") else "")
    return f"{rows}, {p['new_columns']} new col., cache {p['cache_length']}"


def failure(error: str) -> str:
    """The table cell of a program that did not compile."""
    m = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", error)
    if m:
        return f"does not fit: {m.group(1)} GiB of temporaries (HBM {m.group(2)} GiB)"
    return "fails to compile: " + error[:80].replace("|", "/")


def programs_table(programs: list[dict]) -> list[str]:
    """One row per (size, program): shapes, per-device memory, capacity."""
    lines = ["| size | topology | kernel | program | shapes | per-device memory | capacity |",
             "|---|---|---|---|---|---|---|"]
    for r in programs:
        for name in PROGRAMS:
            p = r["programs"].get(name)
            if p is None:
                continue
            head = f"| {size_of(r['experiment'])} | {r['topology']} | {r['attention_kernel']} " \
                   f"| {name} |"
            if "error" in p:
                lines.append(f"{head} {shapes(name, p) if 'rows' in p else '-'} | "
                             f"{failure(p['error'])} | {gib(r['device_memory_capacity_bytes'])} |")
                continue
            lines.append(f"{head} {shapes(name, p)} | {gib(p['per_device_memory_bytes'])} | "
                         f"{gib(p['device_memory_capacity_bytes'])} |")
    return lines


def table(results: str = RESULTS) -> str:
    train, programs = load(results)
    return "\n".join(
        ["Train step with the config's attention kernel "
         "(`<experiment>_<topology>.json`):", ""] + train_table(train)
        + ["", "Every program a pod run executes (`programs_<experiment>_<topology>.json`):",
           ""] + programs_table(programs))


def update_doc(doc: str, results: str = RESULTS) -> None:
    with open(doc) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no marker lines {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(doc, "w") as f:
        f.write(f"{head}{BEGIN}\n{table(results)}\n{END}{tail}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=RESULTS)
    parser.add_argument("--doc", default="", help="rewrite the table in this markdown file")
    args = parser.parse_args()
    if args.doc:
        update_doc(args.doc, args.results)
    print(table(args.results))


if __name__ == "__main__":
    main()
