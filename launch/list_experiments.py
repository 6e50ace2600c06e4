"""List the registered experiments: name, parameters, tokens per step, description.

  python -m launch.list_experiments [--json] [--filter=SUBSTRING]

Parameter counts are abstract (jax.eval_shape): nothing is allocated, so the 7B
configs list on a laptop.
"""
from __future__ import annotations

import json

from absl import app, flags

_JSON = flags.DEFINE_bool("json", False, "Print a JSON list of objects instead of a table.")
_FILTER = flags.DEFINE_string("filter", "", "Only experiments whose name contains this.")


def rows(name_filter: str = "") -> list[dict]:
    from experiments import registry
    from tfusion.scaling.compute import tokens_per_step, trained_params

    out = []
    for name, entry in registry.EXPERIMENTS.items():
        if name_filter not in name:
            continue
        config = registry.get_config(name)
        out.append(dict(name=name, params=trained_params(config.model),
                        tokens_per_step=tokens_per_step(config),
                        description=entry.description))
    return out


def format_table(entries: list[dict]) -> str:
    width = max((len(e["name"]) for e in entries), default=4)
    lines = [f"{'name':<{width}}  {'params':>9}  {'tokens/step':>11}  description"]
    for e in entries:
        lines.append(f"{e['name']:<{width}}  {e['params'] / 1e6:>8.1f}M  "
                     f"{e['tokens_per_step']:>11,}  {e['description']}")
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    entries = rows(_FILTER.value)
    print(json.dumps(entries, indent=1) if _JSON.value else format_table(entries))


if __name__ == "__main__":
    app.run(main)
