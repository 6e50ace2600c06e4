"""The programs of a pod run, built for abstract devices (launch/compile.py compiles them).

Each `program_<name>(target)` lowers and compiles one program exactly as the run
executes it, on the run's sharded mesh (`Target`: the trainer's mesh, rule table and
optimizer), and returns (compiled, description of the shapes it was built with).
Inference programs go through tfusion.inference.engine.Engine's own jitted steps
and cache maker, so they follow the engine's layout whatever it is.
"""
from __future__ import annotations

import contextlib

PROGRAMS = ("train", "eval", "eval_diagnostics", "decode", "diffusion_step", "diffusion_loop",
            "vae_decode")

# The VAE the paper configs' latents come from (256 px -> 32x32x8): SD-VAE widths, 8
# latent channels (tfusion/autoencoders/config.py, "paper f8c8").
VAE_LATENT_CHANNELS = 8


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
        self.tx = optimizer.make_optimizer(config.optimizer,
                                           tuple(config.train.get("freeze", ())))
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


def batch_description(config):
    return dict(rows=config.train.batch_size, seq_len=config.data.seq_len,
                image_slots=config.data.max_images_per_row)


def program_train(target):
    compiled, _ = compile_step(target.config, target.devices)
    return compiled, dict(batch_description(target.config),
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
    return compiled, dict(batch_description(config),
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
    return compiled, dict(batch_description(config), passes_per_batch=2 * (
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

    from tfusion.inference import diffusion_samplers as samplers

    b, rows, max_len = _inference_shapes(target, guided=True)
    cache = _abstract_cache(engine, rows, max_len)
    x = _rows_abstract(target, jnp.zeros((b,) + tuple(engine.latent_shape), jnp.float32))
    x = samplers.SamplerState(x, x)  # the latents and the previous step's x0
    counters = _rows_abstract(target, jnp.zeros((b,), jnp.int32))
    d = target.config.diffusion
    schedule = engine.schedule(int(d.sample_steps), str(d.get("sample_spacing", "linspace")))
    schedule = _replicate(target, schedule)
    block = _columns(target, rows, engine.image_columns)
    options = dict(sampler=str(d.sampler), guided=True, prediction=engine.process.prediction,
                   process=engine.process.process, clip=None)
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


def _program_diffusion(target, fused: bool):
    """One cached diffusion sampling step with CFG, or (fused) the K-step loop."""
    import jax.numpy as jnp

    engine = abstract_engine(target)
    cache, x, counters, schedule, block, options, describe = _diffusion_args(target, engine)
    scalar_i = _abstract(jnp.zeros((), jnp.int32), target.replicated)
    scale = _abstract(jnp.zeros((), jnp.float32), target.replicated)
    keys = _keys(target, engine, x.x.shape[0])
    # diffusion_steps takes (first, count) where diffusion_step takes i.
    step, steps_args = ((engine.diffusion_steps, (scalar_i, scalar_i)) if fused
                        else (engine.diffusion_step, (scalar_i,)))
    lowered = _lower_engine_step(engine, step, cache, x, *steps_args, keys, counters, block,
                                 schedule, scale, **options)
    what = ("the fused K-step sampling loop (lax.fori_loop over the step; K traced)" if fused
            else "one cached diffusion sampling step with CFG: the image's patches against "
                 "the prefix")
    return lowered.compile(), dict(describe, what=what)


def program_diffusion_step(target):
    return _program_diffusion(target, fused=False)


def program_diffusion_loop(target):
    return _program_diffusion(target, fused=True)


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
