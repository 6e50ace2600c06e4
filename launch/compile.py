"""Compile the train step ahead of time for a TPU topology, on this (CPU) machine.

  /work/venv-aot/bin/python -m launch.compile \\
      --config=experiments/registry.py:transfusion_7B --topology=v5p-256

Needs libtpu (the separate AOT venv: `pip install 'jax[tpu]'`); no TPU is used:
jax.experimental.topologies gives abstract devices and XLA:TPU compiles for them.
Writes benchmarks/results/compile/<experiment>_<topology>.json with the per-device
memory the compiled step needs, the chip's capacity, and FLOPs (XLA's count and
tfusion.flops' analytic count of what the dense path executes).

XLA's cost analysis counts a scanned layer once, so the compiled FLOPs come from
two extra shallow compiles (depth 1 and 2, same mesh and batch):
total = F(1) + (depth - 1) * (F(2) - F(1)).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/registry.py:NAME")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-256",
                                "v5p-N / v4-N (N TensorCores, 2 per chip), v5e-N / v6e-N "
                                "(N chips), or a raw libtpu name like v5p:4x4x8.")
_OUT = flags.DEFINE_string("out", "", "Output JSON (default benchmarks/results/compile/"
                                      "<experiment>_<topology>.json).")
_COUNT_FLOPS = flags.DEFINE_bool("count_flops", True, "Run the two shallow compiles for FLOPs.")

# Chips -> libtpu 3D (v4/v5p) or 2D (v5e/v6e) shapes.
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8", 512: "8x8x8"}
_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# HBM per chip (bytes): v5p 95 GiB, v4 32 GiB, v5e 16 GiB, v6e 32 GiB.
HBM_BYTES = {"v5p": 95 * 2**30, "v4": 32 * 2**30, "v5e": 16 * 2**30, "v6e": 32 * 2**30}


def libtpu_topology(name: str) -> tuple[str, str]:
    """("v5p-256" or "v5p:4x4x8") -> (generation, libtpu topology name)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name)
    if m:
        gen, n = m.group(1), int(m.group(2))
        chips = n // 2 if gen in ("v4", "v5p") else n
        shape = (_3D if gen in ("v4", "v5p") else _2D)[chips]
        return gen, f"{gen}:{shape}"
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):[\dx]+", name)
    if not m:
        raise app.UsageError(f"--topology={name!r}: expected e.g. v5p-256 or v5p:4x4x8")
    return m.group(1), name


def abstract_batch(config, mesh, table):
    import jax

    from tfusion.batch import BatchSpec
    from tfusion.train.step import batch_shardings
    from tfusion.batch import BATCH_NDIMS

    m = config.model
    spec = BatchSpec(config.train.batch_size, config.data.seq_len, config.data.max_images_per_row,
                     (m.latent_height, m.latent_width, m.latent_channels), m.patch_size)
    shardings = batch_shardings(mesh, table, BATCH_NDIMS)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
            for k, (shape, dtype) in spec.shapes().items()}


def compile_step(config, devices):
    """The trainer's jitted train step, lowered and compiled for abstract devices."""
    from tfusion import sharding
    from tfusion.train.step import Objective
    from tfusion.train import optimizer, state as state_lib, step as step_lib
    from tfusion.batch import BATCH_NDIMS
    from tfusion.train.params import abstract_model

    mesh = sharding.make_mesh(config.mesh, devices)
    table = sharding.rule_table(config.mesh.rule_overrides)
    tx = optimizer.make_optimizer(config.optimizer)
    schedule = optimizer.learning_rate_schedule(config.optimizer, config.train.steps)
    state_sh = state_lib.train_state_shardings(config.model, tx, mesh, table)
    graphdef, _ = abstract_model(config.model)
    step = step_lib.make_train_step(Objective(graphdef, config), tx, schedule,
                                    config.train.grad_accum_steps, mesh, table)
    jitted = step_lib.jit_train_step(step, mesh, table, state_sh, BATCH_NDIMS)
    state = state_lib.abstract_state(config.model, tx, state_sh)
    compiled = jitted.lower(state, abstract_batch(config, mesh, table)).compile()
    return compiled, mesh


def compiled_flops(compiled) -> float:
    """Per-device FLOPs XLA counts for one step (scan bodies once)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def analytic_flops(config) -> float:
    """tfusion.flops on what the dense XLA path executes (all positions and pairs)."""
    import numpy as np

    from tfusion import flops

    b, l, mslots = config.train.batch_size, config.data.seq_len, config.data.max_images_per_row
    shapes = dict(segment_ids=np.zeros((b, l), np.int32), image_mask=np.zeros((b, mslots), bool))
    return 3.0 * flops.forward_flops(config.model, flops.executed_stats(shapes))


def scan_corrected_flops(config, devices) -> float:
    """Global compiled FLOPs with the layers counted depth times: XLA counts a scan
    body once, so compile depth 1 and 2 unrolled and extrapolate the per-layer cost."""
    per_depth = []
    for depth in (1, 2):
        shallow = config.copy_and_resolve_references()
        shallow.model.depth = depth
        shallow.model.scan_layers = False
        per_depth.append(compiled_flops(compile_step(shallow, devices)[0]))
    body = per_depth[1] - per_depth[0]
    return (per_depth[0] + (config.model.depth - 1) * body) * len(devices)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host probe
    from jax.experimental import topologies

    from tfusion import sharding

    config = _CONFIG.value
    gen, topo_name = libtpu_topology(_TOPOLOGY.value)
    devices = topologies.get_topology_desc(topology_name=topo_name, platform="tpu").devices
    start = time.time()
    compiled, mesh = compile_step(config, devices)
    mem = compiled.memory_analysis()
    # Peak live bytes on one device: arguments (state, batch) + temporaries + outputs
    # not aliased to donated arguments + generated code.
    per_device = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                  + mem.output_size_in_bytes - mem.alias_size_in_bytes
                  + mem.generated_code_size_in_bytes)
    seconds = time.time() - start
    result = dict(
        experiment=config.name, topology=_TOPOLOGY.value, libtpu_topology=topo_name,
        devices=len(devices), device_kind=devices[0].device_kind,
        mesh=dict(mesh.shape), mesh_description=sharding.describe(mesh),
        per_device_memory_bytes=int(per_device),
        device_memory_capacity_bytes=HBM_BYTES[gen],
        memory_breakdown=dict(argument=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
                              output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
                              code=mem.generated_code_size_in_bytes),
        compiled_flops=scan_corrected_flops(config, devices) if _COUNT_FLOPS.value else None,
        compiled_flops_as_reported_per_device=compiled_flops(compiled),
        analytic_flops=analytic_flops(config),
        batch=dict(rows=config.train.batch_size, seq_len=config.data.seq_len,
                   image_slots=config.data.max_images_per_row),
        remat_policy=config.model.remat_policy, compile_seconds=round(seconds, 1),
        command=" ".join(["python -m launch.compile"] + sys.argv[1:]),
    )
    out = _OUT.value or os.path.join("benchmarks", "results", "compile",
                                     f"{config.name}_{_TOPOLOGY.value}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
