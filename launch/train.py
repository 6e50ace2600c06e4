"""Train a Transfusion model.

  python -m launch.train --config=experiments/registry.py:shapes_tiny --workdir=/tmp/run \\
      [--config.train.steps=100 ...]

The run is put together by launch/train_setup.py (config validation, the data
pipeline, tokenizer and final evaluation handed to tfusion's Trainer).
Re-running with the same --workdir resumes from its newest checkpoint. Multi-host:
run the same command on every host; jax.distributed is initialised from the
environment (TPU slice, SLURM), or from --coordinator_address/--num_processes/
--process_id (or TFUSION_COORDINATOR_ADDRESS / TFUSION_NUM_PROCESSES /
TFUSION_PROCESS_ID). See docs/training.md. The trainer runs in a child process of
this one (launch/supervise.py; TFUSION_SUPERVISE=0 runs it in this process).
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from launch import supervise

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/registry.py:shapes_tiny",
    "Experiment config: experiments/registry.py:NAME; override fields with --config.X=Y.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0 for jax.distributed (explicit mode).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax logs every checkpoint file operation at INFO through absl: keep our lines.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("tfusion").setLevel(logging.INFO)
    # Imported here so that jax is configured (platform, distributed) by flags first.
    from data_pipelines import UnusableDataError
    from launch.train_setup import train
    from tfusion.config import ConfigError
    from tfusion.train import distributed
    from tfusion.train.checkpoint import CheckpointSaveError, NoRestorableCheckpointError
    from tfusion.train.loop import NonFiniteError
    from tfusion.train.workdir import WorkdirLockedError

    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    # A fault the user must act on ends the run with one error line and its exit code
    # (docs/reliability.md), not a traceback.
    exit_codes = ((ConfigError, 2, "invalid config: "), (NonFiniteError, 3, ""),
                  (UnusableDataError, 4, "unusable data: "),
                  (CheckpointSaveError, 5, ""), (NoRestorableCheckpointError, 5, ""),
                  (WorkdirLockedError, 6, ""))
    try:
        result = train(_CONFIG.value, _WORKDIR.value)
    except tuple(error for error, _, _ in exit_codes) as e:
        code, prefix = next((c, p) for error, c, p in exit_codes if isinstance(e, error))
        logging.getLogger("tfusion").error("%s%s", prefix, e)
        sys.exit(code)
    logging.getLogger("tfusion").info("finished: step %d (%s)", result.step, result.stopped)


def run() -> None:
    """Console script `tfusion-train`: the trainer in a supervised child process
    (launch/supervise.py: a fatal abort still ends with a line naming the checkpoint)."""
    if supervise.supervised():
        command = [sys.executable, "-m", "launch.train", *sys.argv[1:]]
        sys.exit(supervise.supervise(command, supervise.workdir_from_argv(sys.argv[1:])))
    supervise.exit_with_parent()
    app.run(main)


if __name__ == "__main__":
    run()
