"""The real training loop against its own step timed alone, on the same batches.

    python benchmarks/train_loop.py [--steps 60] [--log-every 10] [--config shapes_tiny]

Issue: a loop that synchronises with the host every step (FLOPs for MFU, flags,
reading the next batch) runs slower than the jitted step it calls. This runs the
README main job's experiment through `Trainer.run` (the whole loop: input feed
thread, FLOPs, non-finite checks, logging; sampling, evaluation and intermediate
checkpoints off) and reads its per-interval `step_s` from metrics.jsonl; then it
reads the same batches again from a fresh iterator, puts them on the device, and
times `Trainer.step_fn` alone over the same intervals (one block per interval, as
the loop blocks only at log steps). The first interval (compilation) is dropped.
`loop_over_step_alone` = median loop step / median step alone (target <= 1.10).
Both halves run twice, interleaved (alone, loop, alone, loop), because this machine
is shared and its speed drifts within minutes.
Writes benchmarks/results/train_loop.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

DEFAULT_OUT = os.path.join(_HERE, "results", "train_loop.json")


def load_config(name: str, steps: int, log_every: int):
    from experiments.registry import get_config
    c = get_config(name)
    c.train.update(steps=steps, log_every=log_every, eval_every=0, sample_every=0,
                   checkpoint_every=0, final_eval_suite="")
    return c


def loop_step_seconds(config, workdir: str) -> list[float]:
    """Per-step seconds of each logged interval after the first, from Trainer.run."""
    from launch.train_setup import train
    train(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "step_s" in r and r.get("split", "train") == "train"]
    return [r["step_s"] for r in train_rows[1:]]


def step_alone_seconds(config, workdir: str, log_every: int) -> list[float]:
    """Per-step seconds of Trainer.step_fn over the run's batches, one block per interval."""
    import jax
    from launch.train_setup import make_trainer
    from tfusion.train import distributed, state as state_lib

    trainer = make_trainer(config, workdir)
    it = trainer._iterator(trainer.train_iterator_fn)
    batches = [distributed.global_batch(next(it), trainer.mesh, trainer.table)
               for _ in range(config.train.steps)]
    _, state = state_lib.init_state(config.model, trainer.tx, trainer.mesh, trainer.table,
                                    config.train.seed, trainer.state_sh)
    per_step = []
    for start in range(0, len(batches), log_every):
        tick = time.perf_counter()
        for batch in batches[start:start + log_every]:
            state, metrics = trainer.step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        per_step.append((time.perf_counter() - tick) / len(batches[start:start + log_every]))
    return per_step[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="shapes_tiny")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    import jax

    config = load_config(args.config, args.steps, args.log_every)
    loop, alone = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            alone += step_alone_seconds(config, os.path.join(d, "alone"), args.log_every)
            loop += loop_step_seconds(config, os.path.join(d, "loop"))
        print(f"round {r}: loop median {statistics.median(loop):.4f} s/step, "
              f"step alone {statistics.median(alone):.4f} s/step", flush=True)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "devices": jax.device_count(),
                    "load_average_at_start": os.getloadavg()},
        "config": args.config, "steps": args.steps, "log_every": args.log_every,
        "loop_step_s": loop, "step_alone_s": alone,
        "loop_step_s_median": statistics.median(loop),
        "step_alone_s_median": statistics.median(alone),
        "loop_over_step_alone": statistics.median(loop) / statistics.median(alone),
    }
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
