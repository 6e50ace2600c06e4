"""Gathers the headline figures of benchmarks/results/*.json into docs/benchmarks.md.

    python benchmarks/summarize.py [--results benchmarks/results] [--doc docs/benchmarks.md]

Each benchmark owns its JSON layout, so this reads them generically: every numeric
leaf (or short numeric list) whose key names a rate, a ratio, an efficiency or a
headline time becomes a row
"benchmark | figure (JSON path) | value". The table replaces the text between the
two marker lines in the doc; the rest of the doc is written by hand.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# A figure is a headline when its key (or the key of the dict holding it) matches.
HEADLINE = re.compile(r"per_s$|^mfu|(^|_)ratio(_|$)|efficiency|^peak_flops$|skipped_by_kernel|latency"
                      r"|_ms$|^image_s$|^step_s_\w+|psnr|speedup|^fraction_of|_over_")
_HERE = os.path.dirname(os.path.abspath(__file__))


def headline_leaves(tree, path=()):
    """(path, value) of headline numbers; short numeric lists become one value."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from headline_leaves(value, path + (str(key),))
        return
    is_number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if isinstance(tree, list) and not (0 < len(tree) <= 8 and all(map(is_number, tree))):
        return
    if not (is_number(tree) or isinstance(tree, list)) or not path:
        return
    if any(HEADLINE.search(key) for key in path[-2:]):
        yield ".".join(path), tree


def fmt(value) -> str:
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    if abs(value) >= 1e6:
        return f"{value:.3g}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def run_notes(data: dict) -> str:
    """Command, time and load averages (top level or under "machine") of one run."""
    found = {k: v for k, v in data.items() if k in ("command", "time")}
    for scope in (data, data.get("machine", {})):
        if isinstance(scope, dict):
            found.update({k: v for k, v in scope.items() if k.startswith("load_average")})
    rounded = json.loads(json.dumps(found), parse_float=lambda x: round(float(x), 1))
    return "; ".join(f"{k} `{json.dumps(v)}`" for k, v in rounded.items()) or "no run notes"


def table(results_dir: str) -> str:
    lines = ["| benchmark | figure | value |", "|---|---|---|"]
    notes = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            notes.append(f"- {name}: unreadable ({e})")
            continue
        for figure, value in headline_leaves(data):
            lines.append(f"| {name} | `{figure}` | {fmt(value)} |")
        if isinstance(data, dict):
            notes.append(f"- {name}: {run_notes(data)}")
    return "\n".join(lines + [""] + notes)


def update_doc(doc: str, results_dir: str) -> None:
    with open(doc) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} lacks the marker lines {BEGIN} / {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(doc, "w") as f:
        f.write(f"{head}{BEGIN}\n{table(results_dir)}\n{END}{tail}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join(_HERE, "results"))
    parser.add_argument("--doc", default=os.path.join(os.path.dirname(_HERE), "docs",
                                                      "benchmarks.md"))
    args = parser.parse_args()
    update_doc(args.doc, args.results)
    print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
