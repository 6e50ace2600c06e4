"""Where the train step's time goes: the trainer's step taken apart, against bare JAX.

    python benchmarks/step_breakdown.py [--shape cpu-s] [--scenario fixed] [--steps 10]

Times, in one process at one batch shape (median of blocked steps, after a warm-up):
  trainer_step       Trainer.step_fn: loss + grads + AdamW + clipping + non-finite guard
  loss_and_grads     jit(value_and_grad(objective.loss)): the model's forward + backward
  forward            jit(objective.loss)
  bare_step          benchmarks/bare_jax_step.py's whole step (forward, backward, Adam)
  bare_loss_and_grads its forward + backward only
The differences attribute time: optimizer and guard = trainer_step - loss_and_grads;
model overhead over plain JAX = loss_and_grads - bare_loss_and_grads (images,
packed-document masks, modality layers, ...). Writes
benchmarks/results/step_breakdown_<scenario>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import workloads  # noqa: E402
from timing import timed_calls  # noqa: E402
from train_throughput import (experiment_config, fixed_batches, machine_info,  # noqa: E402
                              mix_batches, reexec_with_benchmark_env, scenario_spec)


def median_time(call, warmup: int, steps: int) -> float:
    return statistics.median(timed_calls(call, warmup, steps)[0])


def tfusion_parts(shape, scenario: str, warmup: int, steps: int, seed: int) -> dict:
    import jax

    from tfusion.train import state as state_lib
    from tfusion.train.loop import Trainer

    spec = scenario_spec(scenario, shape)
    config = experiment_config(shape, spec.batch_size, spec.seq_len, spec.max_images)
    make = fixed_batches if scenario == "fixed" else mix_batches
    batch = jax.device_put(make(shape, spec, 1, seed, config.model.pad_id)[0])
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir)
        _, state = state_lib.init_state(config.model, trainer.tx, trainer.mesh, trainer.table,
                                        config.train.seed, trainer.state_sh)
        key = jax.random.key(seed)
        objective = trainer.objective
        loss_and_grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))
        forward = jax.jit(objective.loss)
        params = state["params"]
        out = dict(loss_and_grads=median_time(lambda _: loss_and_grads(params, batch, key),
                                              warmup, steps),
                   forward=median_time(lambda _: forward(params, batch, key), warmup, steps))
        holder = {"state": state}

        def step(_):
            holder["state"], metrics = trainer.step_fn(holder["state"], batch)
            return metrics

        out["trainer_step"] = median_time(step, warmup, steps)
        trainer.checkpointer.close()
    return out


def bare_parts(shape, rows: int, seq_len: int, warmup: int, steps: int, seed: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import bare_jax_step

    params = bare_jax_step.init_params(jax.random.key(seed), shape)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, shape.vocab, (rows, seq_len)),
                         jnp.int32)
    grads = jax.jit(jax.value_and_grad(bare_jax_step.forward_loss), static_argnums=2)
    out = dict(bare_loss_and_grads=median_time(lambda _: grads(params, tokens, shape),
                                               warmup, steps))
    zeros = jax.tree.map(jnp.zeros_like, params)
    holder = {"state": (params, zeros, zeros, jnp.zeros((), jnp.float32))}
    step_fn = bare_jax_step.make_step(shape)

    def step(_):
        holder["state"], loss = step_fn(holder["state"], tokens)
        return loss

    holder["state"] = jax.tree.map(jnp.copy, holder["state"])  # donation needs own buffers
    out["bare_step"] = median_time(step, warmup, steps)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="cpu-s", choices=sorted(workloads.SHAPES))
    parser.add_argument("--scenario", default="fixed", choices=["fixed", "mix"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="default benchmarks/results/step_breakdown_<scenario>.json")
    args = parser.parse_args()
    reexec_with_benchmark_env()
    out = args.out or os.path.join(_HERE, "results", f"step_breakdown_{args.scenario}.json")

    shape = workloads.SHAPES[args.shape]
    spec = scenario_spec(args.scenario, shape)
    load = {"start": os.getloadavg()}
    seconds = tfusion_parts(shape, args.scenario, args.warmup, args.steps, args.seed)
    seconds.update(bare_parts(shape, spec.batch_size, spec.seq_len, args.warmup, args.steps,
                              args.seed))
    load["end"] = os.getloadavg()
    ratio = {f"{k}_over_bare_step": v / seconds["bare_step"] for k, v in seconds.items()}
    result = dict(benchmark="step_breakdown", shape=args.shape, scenario=args.scenario,
                  command=shlex.join(["python", *sys.argv]), machine=machine_info(),
                  seconds_median=seconds, ratio=ratio,
                  optimizer_and_guard_share=1 - seconds["loss_and_grads"] / seconds["trainer_step"],
                  load_average=load, time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(dict(seconds=seconds, ratio=ratio), indent=1))


if __name__ == "__main__":
    main()
