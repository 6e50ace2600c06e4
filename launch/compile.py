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

import contextlib
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
_PROGRAMS = flags.DEFINE_string("programs", "train",
                                "'train' (the <experiment>_<topology>.json file), 'all', or a "
                                "comma list of: " + ", ".join(
                                    ("train", "eval", "eval_diagnostics", "decode",
                                     "diffusion_step", "diffusion_loop", "vae_decode")))
_KERNEL = flags.DEFINE_string("attention_kernel", "",
                              "Override config.model.attention_kernel ('' = the config's). "
                              "Platform-dependent names (flash, auto) resolve to flash_tpu: "
                              "this machine's backend is not the target's.")
_OUT = flags.DEFINE_string("out", "", "Output JSON (default benchmarks/results/compile/"
                                      "<experiment>_<topology>.json, or programs_<...>.json).")
_COUNT_FLOPS = flags.DEFINE_bool("count_flops", True, "Run the two shallow compiles for FLOPs.")

PROGRAMS = ("train", "eval", "eval_diagnostics", "decode", "diffusion_step", "diffusion_loop",
            "vae_decode")
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
# The VAE the paper configs' latents come from (256 px -> 32x32x8): SD-VAE widths, 8
# latent channels (tfusion/autoencoders/config.py, "paper f8c8").
VAE_LATENT_CHANNELS = 8


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


# --- abstract arguments ----------------------------------------------------------------


def _abstract(x, sharding):
    """A ShapeDtypeStruct of x (array or ShapeDtypeStruct) placed with `sharding`."""
    import jax

    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _place(tree, shardings):
    """Every leaf of tree as a ShapeDtypeStruct with its sharding; shardings is a prefix
    tree of tree (as for jax.device_put: one sharding per nnx Variable)."""
    import jax

    return jax.tree.map(lambda s, sub: jax.tree.map(lambda a: _abstract(a, s), sub),
                        shardings, tree)


def abstract_batch(config, mesh, table):
    import jax

    from tfusion.batch import BATCH_NDIMS, BatchSpec
    from tfusion.train.step import batch_shardings

    m = config.model
    spec = BatchSpec(config.train.batch_size, config.data.seq_len, config.data.max_images_per_row,
                     (m.latent_height, m.latent_width, m.latent_channels), m.patch_size)
    shardings = batch_shardings(mesh, table, BATCH_NDIMS)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[k])
            for k, (shape, dtype) in spec.shapes().items()}


class Target:
    """The mesh, rule table and optimizer of the run, as the trainer builds them."""

    def __init__(self, config, devices):
        from jax.sharding import NamedSharding, PartitionSpec

        from tfusion import sharding
        from tfusion.train import optimizer, state as state_lib

        self.config, self.devices = config, devices
        self.mesh = sharding.make_mesh(config.mesh, devices)
        # The trainer's table (rule overrides and allow_replicated).
        self.table = sharding.mesh_rules(config.mesh)
        self.tx = optimizer.make_optimizer(config.optimizer)
        self.schedule = optimizer.learning_rate_schedule(config.optimizer, config.train.steps)
        self.ema = state_lib.uses_ema(config)
        self.state_sh = state_lib.train_state_shardings(config.model, self.tx, self.mesh,
                                                        self.table, ema=self.ema)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_parallel(self) -> int:
        """Devices the batch axis is split over (the data-parallel size)."""
        from tfusion.sharding import batch_sharding

        spec = batch_sharding(self.mesh, self.table, 1).spec[0]
        axes = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
        size = 1
        for a in axes:
            size *= self.mesh.shape[a]
        return size

    def batch_sharding(self, ndim: int):
        from tfusion.sharding import batch_sharding

        return batch_sharding(self.mesh, self.table, ndim)

    def abstract_state(self):
        from tfusion.train import state as state_lib

        return state_lib.abstract_state(self.config.model, self.tx, self.state_sh)


# --- the programs ----------------------------------------------------------------------
#
# Each returns (compiled, description): description says what shapes it was built
# with (rows, cache length, ...), recorded in the program's JSON entry.


def compile_step(config, devices):
    """The trainer's jitted train step, lowered and compiled for abstract devices."""
    from tfusion.batch import BATCH_NDIMS
    from tfusion.train import step as step_lib
    from tfusion.train.params import abstract_model
    from tfusion.train.step import Objective

    target = Target(config, devices)
    graphdef, _ = abstract_model(config.model)
    step = step_lib.make_train_step(Objective(graphdef, config), target.tx, target.schedule,
                                    config.train.grad_accum_steps, target.mesh, target.table,
                                    ema_decay=float(config.train.get("ema_decay", 0.0)))
    jitted = step_lib.jit_train_step(step, target.mesh, target.table, target.state_sh,
                                     BATCH_NDIMS)
    compiled = jitted.lower(target.abstract_state(),
                            abstract_batch(config, target.mesh, target.table)).compile()
    return compiled, target.mesh


def _batch_description(config):
    return dict(rows=config.train.batch_size, seq_len=config.data.seq_len,
                image_slots=config.data.max_images_per_row)


def program_train(target):
    compiled, _ = compile_step(target.config, target.devices)
    return compiled, dict(_batch_description(target.config),
                          what="train step: loss, grads, AdamW update (params and Adam "
                               "state donated)")


def _eval_rng(target):
    import jax

    from tfusion.train.params import stream_keys

    key = jax.eval_shape(lambda: jax.random.fold_in(stream_keys(0)["eval"], 0))
    return _abstract(key, target.replicated)


def program_eval(target):
    from tfusion.batch import BATCH_NDIMS
    from tfusion.train import step as step_lib
    from tfusion.train.params import abstract_model
    from tfusion.train.step import Objective

    config = target.config
    graphdef, _ = abstract_model(config.model)
    eval_fn = step_lib.make_eval_step(Objective(graphdef, config), target.mesh, target.table,
                                      target.state_sh["params"], BATCH_NDIMS)
    state = target.abstract_state()
    compiled = eval_fn.lower(state["params"], abstract_batch(config, target.mesh, target.table),
                             _eval_rng(target)).compile()
    return compiled, dict(_batch_description(config),
                          what="held-out eval step: the objective's loss sums of one batch "
                               "(eval batch = train batch)")


def program_eval_diagnostics(target):
    """One pass of HeldoutEvaluator.batch_sums: the batch's images at one noise level
    (the diagnostics run it for the text pass and every bucket, true and rolled),
    built as tfusion.train.loop builds it: the forward traced in the mesh's
    activation sharding."""
    import jax.numpy as jnp

    from tfusion import diffusion
    from tfusion.eval.heldout import HeldoutEvaluator
    from tfusion.train.params import abstract_model

    config = target.config
    graphdef, _ = abstract_model(config.model)
    evaluator = HeldoutEvaluator(graphdef, config,
                                 process=diffusion.NoiseProcess(config.diffusion),
                                 out_shardings=target.replicated, mesh=target.mesh,
                                 table=target.table)
    state = target.abstract_state()
    params = state.get("ema_params", state["params"])
    batch = abstract_batch(config, target.mesh, target.table)
    images = batch["images"]
    times = _abstract(jnp.zeros(batch["image_mask"].shape, evaluator.times.dtype),
                      target.batch_sharding(2))
    # Called exactly as batch_sums calls it (the evaluator's jitted pass).
    compiled = evaluator._pass.lower(params, batch, images, images, times,
                                     clean=False).compile()
    return compiled, dict(_batch_description(config), passes_per_batch=2 * (
        1 + len(evaluator.fractions)), params="ema" if target.ema else "raw",
        what="held-out diagnostics: one forward at one noise level + x0 error sums")


@contextlib.contextmanager
def _abstract_device_put():
    """jax.device_put of ShapeDtypeStructs -> ShapeDtypeStructs with the shardings: lets
    Engine place abstract parameters exactly as it places real ones."""
    import jax

    real = jax.device_put

    def put(x, device=None, **kwargs):
        if device is None:
            return x
        return _place(x, device)

    jax.device_put = put
    try:
        yield
    finally:
        jax.device_put = real


def abstract_engine(target):
    """An Engine over abstract (ShapeDtypeStruct) parameters on the run's mesh."""
    from flax import nnx

    from tfusion.inference.engine import Engine
    from tfusion.train.params import abstract_model

    config = target.config
    model = nnx.merge(*abstract_model(config.model))
    with _abstract_device_put():
        return Engine(model, config.diffusion, target.mesh, target.table)


def _lower_engine_step(engine, step, cache, *args, **static):
    """Lowers engine step `step` (e.g. engine.text_step) over abstract params and cache.

    The engine's step reads engine.state when called; the outer jit hands it the
    parameters as arguments (so they are not constants) and donates the cache, as the
    engine's own jit does."""
    import jax

    abstract_state = engine.state

    def run(state, cache, *args):
        engine.state = state
        try:
            return step(cache, *args, **static)
        finally:
            engine.state = abstract_state

    return jax.jit(run, donate_argnums=(1,)).lower(abstract_state, cache, *args)


def _inference_shapes(target, guided: bool):
    """(B prompts, R cache rows, cache length)."""
    b = target.batch_parallel
    return b, 2 * b if guided else b, target.config.data.seq_len


def _abstract_cache(engine, rows: int, max_len: int):
    import jax

    return jax.eval_shape(lambda: engine.new_cache(rows, max_len))


def _rows_abstract(target, x):
    """Per-row arrays: split over the batch axes when the rows divide, else replicated."""
    if x.shape and x.shape[0] % target.batch_parallel == 0:
        return _abstract(x, target.batch_sharding(len(x.shape)))
    return _abstract(x, target.replicated)


def _columns(target, rows: int, width: int):
    import jax.numpy as jnp

    from tfusion.inference.steps import CacheColumns

    ids = jnp.zeros((rows, width), jnp.int32)
    return CacheColumns(*(_rows_abstract(target, ids) for _ in range(3)))


def _keys(target, engine, rows: int):
    import jax
    import numpy as np

    return _rows_abstract(target, jax.eval_shape(engine.keys, np.arange(rows)))


def program_decode(target):
    import jax.numpy as jnp

    engine = abstract_engine(target)
    b, rows, max_len = _inference_shapes(target, guided=False)
    cache = _abstract_cache(engine, rows, max_len)
    tokens = _rows_abstract(target, jnp.zeros((rows, 1), jnp.int32))
    counters = _rows_abstract(target, jnp.zeros((rows,), jnp.int32))
    banned = _rows_abstract(target, jnp.zeros((rows, engine.cfg.vocab_size), bool))
    scalar = _abstract(jnp.zeros((), jnp.float32), target.replicated)
    lowered = _lower_engine_step(engine, engine.text_step, cache, tokens,
                                 _columns(target, rows, 1), _keys(target, engine, rows), counters,
                                 banned, scalar, scalar, None, None, top_k=0)
    return lowered.compile(), dict(
        rows=rows, prompts=b, new_columns=1, cache_length=max_len,
        cache_bytes=_tree_bytes(cache),
        what="cached text step: feed one token per row, sample the next (no CFG: captioning "
             "/ text; B = the data-parallel size, one sequence per device)")


def _diffusion_args(target, engine):
    import jax.numpy as jnp

    b, rows, max_len = _inference_shapes(target, guided=True)
    cache = _abstract_cache(engine, rows, max_len)
    x = _rows_abstract(target, jnp.zeros((b,) + tuple(engine.latent_shape), jnp.float32))
    counters = _rows_abstract(target, jnp.zeros((b,), jnp.int32))
    schedule = engine.schedule(int(target.config.diffusion.sample_steps))
    schedule = _replicate(target, schedule)
    block = _columns(target, rows, engine.image_columns)
    options = dict(sampler=str(target.config.diffusion.sampler), guided=True,
                   prediction=engine.process.prediction, process=engine.process.process,
                   clip=None)
    describe = dict(rows=rows, prompts=b, cfg="rows doubled: [conditional B; unconditional B]",
                    new_columns=engine.image_columns, cache_length=max_len,
                    cache_bytes=_tree_bytes(cache), sampler=options["sampler"],
                    sample_steps=schedule.num_steps if hasattr(schedule, "num_steps") else None)
    return cache, x, counters, schedule, block, options, describe


def _replicate(target, tree):
    import jax

    return jax.tree.map(lambda a: _abstract(a, target.replicated), tree)


def _tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def program_diffusion_step(target):
    import jax.numpy as jnp

    engine = abstract_engine(target)
    cache, x, counters, schedule, block, options, describe = _diffusion_args(target, engine)
    scalar_i = _abstract(jnp.zeros((), jnp.int32), target.replicated)
    scale = _abstract(jnp.zeros((), jnp.float32), target.replicated)
    keys = _keys(target, engine, x.shape[0])
    lowered = _lower_engine_step(engine, engine.diffusion_step, cache, x, scalar_i, keys,
                                 counters, block, schedule, scale, **options)
    return lowered.compile(), dict(describe, what="one cached diffusion sampling step with "
                                                  "CFG: the image's patches against the prefix")


def program_diffusion_loop(target):
    import jax.numpy as jnp

    engine = abstract_engine(target)
    cache, x, counters, schedule, block, options, describe = _diffusion_args(target, engine)
    scalar_i = _abstract(jnp.zeros((), jnp.int32), target.replicated)
    scale = _abstract(jnp.zeros((), jnp.float32), target.replicated)
    keys = _keys(target, engine, x.shape[0])
    lowered = _lower_engine_step(engine, engine.diffusion_steps, cache, x, scalar_i, scalar_i,
                                 keys, counters, block, schedule, scale, **options)
    return lowered.compile(), dict(describe, what="the fused K-step sampling loop "
                                                  "(lax.fori_loop over the step; K traced)")


def program_vae_decode(target):
    """The AutoencoderKL decoder, batch split over the data axes, params by the table
    (the vae_* axes: replicated), through autoencoder_kl.jit_method as sampling uses it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tfusion.autoencoders.autoencoder_kl import AutoencoderKL, jit_method
    from tfusion.autoencoders.config import AutoencoderConfig
    from tfusion.sharding import state_shardings

    config = target.config
    vae_cfg = AutoencoderConfig(latent_channels=VAE_LATENT_CHANNELS)
    latent = vae_cfg.latent_shape(int(config.data.image_size))
    m = config.model
    if latent != (m.latent_height, m.latent_width, m.latent_channels):
        raise ValueError(f"VAE latent {latent} != the model's latent shape")
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0))))
    params = _place(abstract, state_shardings(abstract, target.mesh, target.table))
    b = target.batch_parallel
    latents = _abstract(jnp.zeros((b,) + latent, jnp.float32), target.batch_sharding(4))

    def decode(state, latents):
        return jit_method(nnx.merge(graphdef, state), "decode")(latents)

    compiled = jax.jit(decode).lower(params, latents).compile()
    return compiled, dict(rows=b, latent=list(latent), image_size=int(config.data.image_size),
                          vae="AutoencoderKL f8c8 (SD-VAE widths 128-256-512-512), float32",
                          what="VAE decode of B generated latents (one per device)")


PROGRAM_FNS = {"train": program_train, "eval": program_eval,
               "eval_diagnostics": program_eval_diagnostics, "decode": program_decode,
               "diffusion_step": program_diffusion_step,
               "diffusion_loop": program_diffusion_loop, "vae_decode": program_vae_decode}
assert tuple(PROGRAM_FNS) == PROGRAMS


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
        batch=_batch_description(config), attention_kernel=config.model.attention_kernel,
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
