"""Export a run's parameters only (no optimizer or data state).

  python -m launch.export --workdir=DIR --out=OUT [--params=ema|raw]
      [--format=orbax|safetensors] [--step=N]

orbax: OUT is a run directory holding only the params (OUT/checkpoints/<step>/state
{"params"}, OUT/config.json, OUT/export.json): `launch.generate --workdir=OUT` and
`launch.evaluate --workdir=OUT` load it like the run. safetensors: OUT/model.safetensors
with flat dotted names (backbone.blocks.attn.qkv.kernel, ...) beside config.json and
export.json. See tfusion/eval/export.py. A missing run or checkpoint, or an OUT that
already holds an export, exits with one `error: ...` line on stderr.
"""
from __future__ import annotations

import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/).",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_PARAMS = flags.DEFINE_enum("params", "ema", ["ema", "raw"],
                            "ema: the run's EMA of the parameters (raw where it kept none).")
_FORMAT = flags.DEFINE_enum("format", "orbax", ["orbax", "safetensors"], "Output format.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from tfusion.train import distributed

    distributed.initialize()  # several processes (a pod slice) share one mesh
    from tfusion.config import ConfigError
    from tfusion.eval.checkpoints import RunNotFoundError
    from tfusion.eval.export import ExportExistsError, export

    try:
        info = export(_WORKDIR.value, _OUT.value, _PARAMS.value, _FORMAT.value, _STEP.value)
    except (RunNotFoundError, ConfigError, ExportExistsError) as e:
        sys.exit(f"error: {e}")
    if jax.process_index() == 0:
        print(f"exported the {info['params']} params of step {info['step']} "
              f"({info['tensors']} tensors, {info['format']}) to {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
