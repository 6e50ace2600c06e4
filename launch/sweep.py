"""Run a named sweep locally (one run after another), or print its cluster commands.

  python -m launch.sweep --sweep=cpu_micro --workdir=/tmp/cpu_micro
  python -m launch.sweep --sweep=paper_scaling --workdir=gs://bucket/sweep --print_only
  python -m launch.sweep --sweep=cpu_micro --workdir=/tmp/cpu_micro --report_only

Each run trains in WORKDIR/<run name> through `python -m launch.train` (a
subprocess, so every run starts with a fresh jax). Runs whose metrics already
reach their last step are skipped; unfinished ones are restarted with the same
workdir, which resumes them from their newest checkpoint. After the runs, the
scaling report (fits, parity, table, plots) is written to WORKDIR/report.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys

from absl import app, flags

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep name (experiments/sweeps.py).", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; runs go in <workdir>/<run>.",
                               required=True)
_PRINT_ONLY = flags.DEFINE_bool("print_only", False, "Print the train commands, run nothing.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only collect, fit and plot.")
_COMPUTE = flags.DEFINE_enum("compute", "flops_6nd", ["flops_6nd", "flops_exact"],
                             "Compute axis of the fits (the paper uses 6ND).")
_IRREDUCIBLE = flags.DEFINE_bool("irreducible", False, "Fit L = a C^-b + c instead of a C^-b.")
_FLOPS_BATCHES = flags.DEFINE_integer("flops_batches", 2, "Data batches per run for the exact "
                                                          "FLOP count (0 = skip it).")

_log = logging.getLogger("tfusion.sweep")


def resolved_overrides(run, workdir: str) -> dict:
    """The run's overrides with the sweep-dir placeholder replaced by `workdir`."""
    from experiments.sweeps import SWEEP_DIR

    return {field: value.replace(SWEEP_DIR, workdir) if isinstance(value, str) else value
            for field, value in run.overrides.items()}


def train_command(run, workdir: str, python: str = "python") -> list[str]:
    cmd = [python, "-m", f"launch.{run.program}",
           f"--config=experiments/registry.py:{run.experiment}",
           f"--workdir={os.path.join(workdir, run.name)}"]
    return cmd + [f"--config.{field}={value}"
                  for field, value in resolved_overrides(run, workdir).items()]


def run_config(run, workdir: str):
    from experiments import ablations, registry
    return ablations.apply_overrides(registry.get_config(run.experiment),
                                     resolved_overrides(run, workdir))


def run_finished(run, run_dir: str, workdir: str) -> bool:
    from tfusion.scaling.collect import is_finished

    if run.program == "train_autoencoder":  # weights are written once, at the end
        from tfusion.autoencoders.train_config import WEIGHTS_DIR
        return os.path.exists(os.path.join(run_dir, WEIGHTS_DIR, "config.json"))
    config = run_config(run, workdir)
    if config.train.get("final_eval_suite", ""):  # finished = its final evaluation logged
        from tfusion.scaling.collect import last_values, read_rows
        return bool(last_values(read_rows(run_dir), "final_eval"))
    return is_finished(run_dir, config.train.steps)


def run_all(runs, workdir: str) -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for i, run in enumerate(runs):
        run_dir = os.path.join(workdir, run.name)
        if run_finished(run, run_dir, workdir):
            _log.info("[%d/%d] %s: finished, skipped", i + 1, len(runs), run.name)
            continue
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "sweep_run.json"), "w") as f:
            json.dump(run._asdict(), f, indent=1)
        cmd = train_command(run, workdir, sys.executable)
        _log.info("[%d/%d] %s", i + 1, len(runs), shlex.join(cmd))
        subprocess.run(cmd, cwd=repo, check=True)


def data_batches(num: int):
    """step_batches callback for the exact FLOP count: a few batches of the run's data."""
    def batches(config):
        import data_pipelines
        it = data_pipelines.make_train_iterator(config, process_index=0, process_count=1)
        out = [next(it) for _ in range(num)]
        getattr(it, "close", lambda: None)()
        return out
    return batches


def diffusion_report(workdir: str) -> None:
    from experiments.sweeps import DIFFUSION_ABLATIONS
    from tfusion.eval.diffusion_report import write_report

    out = os.path.join(workdir, "report")
    write_report([(name, os.path.join(workdir, name), what)
                  for name, (_, what) in DIFFUSION_ABLATIONS.items()], out)
    with open(os.path.join(out, "table.md")) as f:
        print(f.read())
    _log.info("report in %s", out)


def reproduction_report(workdir: str) -> None:
    from tfusion.scaling import collect, reproduction

    step_batches = data_batches(_FLOPS_BATCHES.value) if _FLOPS_BATCHES.value else None
    points = collect.collect_sweep(workdir, step_batches)
    out = os.path.join(workdir, "report")
    reproduction.write(points, out, _COMPUTE.value)
    with open(os.path.join(out, "reproduction.md")) as f:
        print(f.read())
    _log.info("report in %s", out)


def report(workdir: str) -> None:
    from tfusion.scaling import collect, report as report_lib

    step_batches = data_batches(_FLOPS_BATCHES.value) if _FLOPS_BATCHES.value else None
    points = collect.collect_sweep(workdir, step_batches)
    if not points:
        _log.warning("no finished runs under %s: no report", workdir)
        return
    out = os.path.join(workdir, "report")
    report_lib.write_report(points, out, _COMPUTE.value, _IRREDUCIBLE.value)
    with open(os.path.join(out, "table.md")) as f:
        print(f.read())
    _log.info("report in %s", out)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("tfusion").setLevel(logging.INFO)
    from experiments import sweeps

    runs = sweeps.expand(_SWEEP.value)
    if _PRINT_ONLY.value:
        for run in runs:
            print(shlex.join(train_command(run, _WORKDIR.value)))
        return
    if not _REPORT_ONLY.value:
        run_all(runs, _WORKDIR.value)
    kind = sweeps.SWEEPS[_SWEEP.value].report
    if kind == "diffusion":
        diffusion_report(_WORKDIR.value)
    elif kind == "reproduction":
        reproduction_report(_WORKDIR.value)
    else:
        report(_WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
