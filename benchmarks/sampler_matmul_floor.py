"""How close the compiled sampler is to the matmuls it cannot avoid (issue 17, part 2).

    python benchmarks/sampler_matmul_floor.py [--repeats 7]

One cached diffusion step of the inference benchmark's model (cpu-s, 64 patches, CFG:
2 rows = 128 token rows) runs, per layer, the fused QKV projection, the output
projection, SwiGLU's gate+up and down projections. This times exactly those matmuls,
chained through the layers in one jitted function with one weight array per layer (a
slice of a layer-stacked array would be a copy on XLA:CPU), next to the engine's real
cached step (empty prefix) and the matmul peak (benchmarks/matmul_peak.py), all in
the same run. `image_floor_s`
= 250 x the matmul-only step: the image time of a sampler whose attention, norms,
embeddings and update cost nothing. Writes benchmarks/results/sampler_matmul_floor.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE), _HERE]

import inference  # noqa: E402  (benchmarks/inference.py: the model, timing, the cached step)
from matmul_peak import measure_peak_flops  # noqa: E402
from tfusion.config import ModelConfig, diffusion_config  # noqa: E402
from tfusion.inference.engine import Engine  # noqa: E402
from tfusion.model.transfusion import Transfusion  # noqa: E402

SAMPLE_STEPS = 250


def matmul_only_step(cfg: ModelConfig, rows: int):
    """(step function of x [rows, width], FLOPs): the layers' dense projections only."""
    d, f, depth = cfg.width, cfg.mlp_dim, cfg.depth
    qkv_out = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 4 * depth))
    init = lambda shape: 0.02 * jax.random.normal(next(keys), shape, jnp.float32)
    layers = [dict(qkv=init((d, qkv_out)), out=init((cfg.num_heads * cfg.head_dim, d)),
                   gate_up=init((d, 2 * f)), down=init((f, d))) for _ in range(depth)]

    @jax.jit
    def step(x):
        for w in layers:
            q = (x @ w["qkv"])[:, :cfg.num_heads * cfg.head_dim]  # stands in for attention
            x = x + q @ w["out"]
            gate, up = jnp.split(x @ w["gate_up"], 2, axis=-1)
            x = x + (jax.nn.silu(gate) * up) @ w["down"]
        return x

    per_row = d * qkv_out + cfg.num_heads * cfg.head_dim * d + d * 2 * f + f * d
    flops = 2 * rows * depth * per_row
    return step, flops


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "sampler_matmul_floor.json"))
    args = ap.parse_args()
    load_start = os.getloadavg()

    model_cfg = inference.cpu_s_config()
    cfg = ModelConfig.of(model_cfg)
    engine = Engine(Transfusion(model_cfg, rngs=nnx.Rngs(0)), diffusion_config())
    rows = 2 * engine.patches_per_image  # CFG: conditional and unconditional rows

    step, flops = matmul_only_step(cfg, rows)
    x = jax.random.normal(jax.random.PRNGKey(1), (rows, cfg.width), jnp.float32)
    floor_s, engine_s, peak = [], [], []
    for _ in range(2):  # interleaved: this machine's speed drifts within minutes
        floor_s.append(inference.timed(lambda: step(x), 4 * args.repeats))
        engine_s.append(inference.cached_step_seconds(engine, 0, args.repeats))
        peak.append(measure_peak_flops(repeats=args.repeats))
    floor, engine_step, best_peak = min(floor_s), min(engine_s), max(peak)
    result = dict(
        benchmark="sampler_matmul_floor",
        command="python " + shlex.join(sys.argv),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine=dict(cpus=os.cpu_count(), jax_version=jax.__version__,
                     load_average=dict(start=load_start, end=os.getloadavg())),
        shape=dict(width=cfg.width, depth=cfg.depth, heads=cfg.num_heads, kv_heads=cfg.kv_heads,
                   mlp_hidden=cfg.mlp_dim, token_rows=rows),
        matmul_flops_per_step=flops,
        matmul_only_step_s=floor, matmul_only_step_s_samples=floor_s,
        matmul_only_gflops=flops / floor / 1e9,
        engine_cached_step_s=engine_step, engine_cached_step_s_samples=engine_s,
        peak_matmul_gflops=best_peak / 1e9,
        matmul_only_fraction_of_peak=flops / floor / best_peak,
        engine_over_matmul_only=engine_step / floor,
        image_floor_s=SAMPLE_STEPS * floor,
        image_engine_steps_s=SAMPLE_STEPS * engine_step,
        target_image_s=8.0,
    )
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))},
                     indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
