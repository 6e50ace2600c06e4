"""Compile the programs of a pod run ahead of time for a TPU topology, on this (CPU) machine.

  python -m launch.compile --config=experiments/registry.py:transfusion_7B --topology=v5p-256
  python -m launch.compile --config=experiments/registry.py:transfusion_7B --topology=v5p-256 \\
      --programs=all --attention_kernel=flash_tpu
  python benchmarks/compile_table.py --doc=docs/experiments.md   # the table, from the JSON

Needs libtpu (`pip install -e '.[tpu]'`, best in a venv of its own); no TPU is used:
jax.experimental.topologies gives abstract devices and XLA:TPU compiles for them.

--programs=train (the default) compiles the trainer's train step and writes
benchmarks/results/compile/<experiment>_<topology>.json with the per-device memory the
step needs, the chip's capacity, and FLOPs (XLA's count and tfusion.flops' analytic
count of what the dense path executes). XLA's cost analysis counts a scanned layer
once, so the compiled FLOPs come from two extra shallow compiles (depth 1 and 2, same
mesh and batch): total = F(1) + (depth - 1) * (F(2) - F(1)).

--programs=all (or a comma list of PROGRAMS) compiles every program a pod run
executes and writes benchmarks/results/compile/programs_<experiment>_<topology>.json,
one entry per program, each on the run's sharded mesh (parameters placed by the
rule table, activations and the KV cache constrained as in training):

  train           the trainer's jitted train step (tfusion.train.step)
  eval            the trainer's held-out eval step (objective sums, raw params)
  eval_diagnostics  the held-out diagnostics' forward pass (tfusion.eval.heldout),
                  the program run 22 times per held-out batch (text + 10 noise levels,
                  each also with the images rolled over the batch)
  decode          the engine's cached text step: one new token per row
  diffusion_step  the engine's cached diffusion step with CFG (rows doubled)
  diffusion_loop  the engine's fused K-step diffusion loop (lax.fori_loop; K traced)
  vae_decode      the f8 AutoencoderKL decoder: latents -> 256 px images
A program that fails is recorded with its error. Naming some programs updates those
entries of an existing file and keeps the others (each entry records its tree).

Inference shapes (what a pod user runs): B = the data-parallel size (the product
of the mesh axes the batch is split over) prompts, one per device; CFG doubles the
rows to 2B (each row's unconditional twin); the KV cache holds data.seq_len columns.
The inference programs are traced through tfusion.inference.engine.Engine's own
jitted steps and its own cache maker (engine.new_cache under jax.eval_shape), so
they follow the cache's layout whatever it is.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from launch.aot_programs import PROGRAM_FNS, PROGRAMS, Target, batch_description, compile_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiments/registry.py:NAME")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-256",
                                "v5p-N / v4-N (N TensorCores, 2 per chip), v5e-N / v6e-N "
                                "(N chips), or a raw libtpu name like v5p:4x4x8.")
_PROGRAMS = flags.DEFINE_string("programs", "train",
                                "'train' (the <experiment>_<topology>.json file), 'all', or a "
                                "comma list of: " + ", ".join(PROGRAMS))
_KERNEL = flags.DEFINE_string("attention_kernel", "",
                              "Override config.model.attention_kernel ('' = the config's). "
                              "Platform-dependent names (flash, auto) resolve to flash_tpu: "
                              "this machine's backend is not the target's.")
_OUT = flags.DEFINE_string("out", "", "Output JSON (default benchmarks/results/compile/"
                                      "<experiment>_<topology>.json, or programs_<...>.json).")
_COUNT_FLOPS = flags.DEFINE_bool("count_flops", True, "Run the two shallow compiles for FLOPs.")

RESULTS_DIR = os.path.join("benchmarks", "results", "compile")
# Platform-dependent kernel names -> the TPU kernel (they read jax.default_backend()
# at trace time, which here is the CPU, not the target).
_TPU_KERNEL = {"flash": "flash_tpu", "auto": "flash_tpu"}
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


def target_kernel(config, override: str = ""):
    """The config with its attention kernel as the TPU target runs it."""
    kernel = override or config.model.attention_kernel
    config = config.copy_and_resolve_references()
    config.model.attention_kernel = _TPU_KERNEL.get(kernel, kernel)
    return config


# --- measurements ----------------------------------------------------------------------


def per_device_memory(compiled) -> tuple[int, dict]:
    """Peak live bytes on one device: arguments + temporaries + outputs not aliased to
    donated arguments + generated code."""
    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                  + mem.output_size_in_bytes - mem.alias_size_in_bytes
                  + mem.generated_code_size_in_bytes)
    return int(per_device), dict(argument=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
                                 output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
                                 code=mem.generated_code_size_in_bytes)


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


def _command() -> str:
    """The command that rewrites this result (an --out elsewhere is left out)."""
    args = [a for a in sys.argv[1:] if not a.startswith("--out")]
    return " ".join(["python -m launch.compile"] + args)


def tree_state() -> str:
    """The commit compiled and how far the work tree is from it (others edit it too)."""
    import subprocess

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    diff = git("diff", "--stat").splitlines()
    return f"{git('rev-parse', '--short', 'HEAD')} + " + (diff[-1].strip() if diff else "clean")


def _header(config, topology, topo_name, devices, mesh):
    from tfusion import sharding

    return dict(experiment=config.name, topology=topology, libtpu_topology=topo_name,
                devices=len(devices), device_kind=devices[0].device_kind,
                mesh=dict(mesh.shape), mesh_description=sharding.describe(mesh),
                tree=tree_state())


def train_result(config, devices, gen, topology, topo_name) -> dict:
    """The <experiment>_<topology>.json record of the train step."""
    start = time.time()
    compiled, mesh = compile_step(config, devices)
    per_device, breakdown = per_device_memory(compiled)
    seconds = time.time() - start
    return dict(
        _header(config, topology, topo_name, devices, mesh),
        per_device_memory_bytes=per_device, device_memory_capacity_bytes=HBM_BYTES[gen],
        memory_breakdown=breakdown,
        compiled_flops=scan_corrected_flops(config, devices) if _COUNT_FLOPS.value else None,
        compiled_flops_as_reported_per_device=compiled_flops(compiled),
        analytic_flops=analytic_flops(config),
        batch=batch_description(config), attention_kernel=config.model.attention_kernel,
        remat_policy=config.model.remat_policy, compile_seconds=round(seconds, 1),
        command=_command())


def programs_result(config, devices, gen, topology, topo_name, names) -> dict:
    """The programs_<experiment>_<topology>.json record: one entry per program."""
    target = Target(config, devices)
    out = dict(_header(config, topology, topo_name, devices, target.mesh),
               device_memory_capacity_bytes=HBM_BYTES[gen],
               attention_kernel=config.model.attention_kernel,
               remat_policy=config.model.remat_policy,
               batch_parallel=target.batch_parallel,
               shapes=("train/eval: the config's global batch; inference: B = batch_parallel "
                       "prompts (one per device), CFG doubles the rows to 2B, KV cache = "
                       "data.seq_len columns; VAE: B latents"),
               programs={}, command=_command())
    for name in names:
        print(f"compiling {name} ...", flush=True)
        start = time.time()
        try:
            compiled, describe = PROGRAM_FNS[name](target)
        except Exception as e:  # recorded: one failing program must not hide the others
            out["programs"][name] = dict(error=f"{type(e).__name__}: {e}"[:2000],
                                         compile_seconds=round(time.time() - start, 1),
                                         tree=out["tree"])
            print(f"  {name} FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
            continue
        per_device, breakdown = per_device_memory(compiled)
        out["programs"][name] = dict(
            per_device_memory_bytes=per_device, device_memory_capacity_bytes=HBM_BYTES[gen],
            memory_breakdown=breakdown,
            compiled_flops_as_reported_per_device=compiled_flops(compiled),
            compile_seconds=round(time.time() - start, 1), tree=out["tree"], **describe)
        print(f"  {name}: {per_device / 2**30:.2f} GiB per device, "
              f"{out['programs'][name]['compile_seconds']} s", flush=True)
    return out


def merged(path: str, result: dict) -> dict:
    """result with the programs an existing file at path holds and this run did not
    compile (same experiment, topology and kernel): one program can be recompiled alone."""
    if not os.path.exists(path):
        return result
    with open(path) as f:
        old = json.load(f)
    same = all(old.get(k) == result.get(k) for k in ("experiment", "topology",
                                                     "attention_kernel"))
    if not same:
        return result
    kept = {k: v for k, v in old.get("programs", {}).items() if k not in result["programs"]}
    if kept:
        both = {**kept, **result["programs"]}
        order = list(PROGRAM_FNS) + sorted(set(both) - set(PROGRAM_FNS))
        result["programs"] = {k: both[k] for k in order if k in both}
        result["commands"] = sorted(set(old.get("commands", [old.get("command", "")])
                                        + [result["command"]]))
    return result


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host probe
    from jax.experimental import topologies

    config = target_kernel(_CONFIG.value, _KERNEL.value)
    gen, topo_name = libtpu_topology(_TOPOLOGY.value)
    devices = topologies.get_topology_desc(topology_name=topo_name, platform="tpu").devices
    names = PROGRAMS if _PROGRAMS.value == "all" else tuple(
        n.strip() for n in _PROGRAMS.value.split(",") if n.strip())
    unknown = sorted(set(names) - set(PROGRAM_FNS))
    if unknown:
        raise app.UsageError(f"--programs: unknown {unknown}; known: {list(PROGRAM_FNS)}")
    if names == ("train",):
        result = train_result(config, devices, gen, _TOPOLOGY.value, topo_name)
        default = f"{config.name}_{_TOPOLOGY.value}.json"
    else:
        default = f"programs_{config.name}_{_TOPOLOGY.value}.json"
        out = _OUT.value or os.path.join(RESULTS_DIR, default)
        result = programs_result(config, devices, gen, _TOPOLOGY.value, topo_name, names)
        result = merged(out, result)
    out = _OUT.value or os.path.join(RESULTS_DIR, default)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
