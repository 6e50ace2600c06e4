"""Engine: a model split once into (graphdef, state) and its jitted decoding steps.

The steps are plain `jax.jit` functions of the parameter state (no NNX graph
traversal per call, which matters at 250 diffusion steps per image). The cache is
donated so XLA updates it in place. With a mesh, parameters are placed by the
logical-axis rule table and activations/caches are constrained exactly as in
training; without one everything runs on the default device.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tfusion import diffusion
from tfusion.config import ConfigError, image_token_offset, is_discrete
from tfusion.inference import cache as cache_lib
from tfusion.inference import diffusion_samplers as samplers, steps
from tfusion.sharding import activation_sharding, rule_table, state_shardings


class Engine:
    def __init__(self, model, diffusion_cfg, mesh=None, table=None):
        """table: the run's logical-axis rule table (sharding.mesh_rules(config.mesh));
        default the built-in one."""
        self.cfg = model.cfg
        # The discrete (Chameleon) baseline samples an image as image_tokens VQ codes,
        # token ids from code_offset on; Transfusion denoises patches of latents.
        self.code_offset = image_token_offset(self.cfg)
        self.discrete = is_discrete(self.cfg)
        self.diffusion_cfg = diffusion_cfg
        self.patches_per_image = self.cfg.patches_per_image
        self.latent_shape = self.cfg.latent_shape
        if self.discrete:  # codes come out as [h, w, 1]: square when image_tokens is
            side = math.isqrt(self.cfg.image_tokens)
            self.code_grid = ((side, side, 1) if side * side == self.cfg.image_tokens
                              else (1, self.cfg.image_tokens, 1))
        self.mesh, self.table = mesh, rule_table() if table is None else table
        self.graphdef, state = nnx.split(model)
        # Same class + config = same graph structure (ModelConfig is frozen, hashable).
        self._structure = (type(model), self.cfg)
        # On the device once: numpy params (a checkpoint read with device_get) would
        # otherwise be copied in by every jitted call, 250 times per image.
        state = jax.device_put(
            state, None if mesh is None else state_shardings(state, mesh, self.table))
        # An unrolled layer loop keeps its layer-stacked weights and cache as one array
        # per layer between calls (see PerLayer); a scanned one needs the stacks.
        self.per_layer = not self.cfg.scan_layers
        self.state = per_layer_weights(state) if self.per_layer else state
        self.process = diffusion.NoiseProcess(diffusion_cfg)
        self._cache_makers, self._schedules = {}, {}
        self.prefill = self._jit(steps.prefill)
        self.text_step = self._jit(steps.text_step, static=("top_k",))
        diffusion_static = ("sampler", "guided", "prediction", "process", "clip")
        self.diffusion_step = self._jit(steps.diffusion_step, static=diffusion_static)
        self.diffusion_steps = self._jit(steps.diffusion_steps,
                                         static=diffusion_static + ("skip_twin",))
        self.commit_image = self._jit(steps.commit_image)
        self.code_step = self._jit(steps.code_step, static=("top_k", "guided", "codebook_size"))
        self.predict = self._jit(steps.predict)
        self.initial_noise = jax.jit(steps.initial_noise, static_argnums=(2,))

    def _jit(self, fn, static=()):
        jitted = _jitted_step(fn, self._structure, self.mesh, tuple(self.table.items()),
                              static, _Unhashed(self.graphdef))
        return functools.partial(_call_with_state, jitted, self)

    @property
    def image_columns(self) -> int:
        """Cache columns one image takes: its patches, or its VQ codes."""
        return self.cfg.image_tokens if self.discrete else self.patches_per_image

    def new_cache(self, rows: int, max_len: int) -> cache_lib.KVCache:
        # Per-engine memos, not functools.lru_cache on methods: that cache is global
        # and would keep up to maxsize engines (each holding its params) alive.
        key = (rows, max_len)
        if key not in self._cache_makers:
            cfg, mesh, table, per_layer = self.cfg, self.mesh, self.table, self.per_layer

            def make():
                with activation_sharding(mesh, table):
                    cache = cache_lib.init_cache(cfg, rows, max_len)
                return per_layer_caches(cache) if per_layer else cache

            self._cache_makers[key] = jax.jit(make)
        return self._cache_makers[key]()

    def schedule(self, num_steps: int, spacing: str = "linspace") -> samplers.Schedule:
        key = (num_steps, spacing)
        if key not in self._schedules:
            self._schedules[key] = samplers.schedule_for(self.process, num_steps, spacing)
        return self._schedules[key]

    def check_sampler(self, sampler: str, spacing: str = "linspace") -> None:
        process = self.process.process
        for field, value, table in (("sampler", sampler, samplers.SAMPLERS_BY_PROCESS),
                                    ("sample_spacing", spacing, samplers.SPACINGS_BY_PROCESS)):
            if value not in table[process]:
                raise ConfigError(f"diffusion.{field}", f"{value!r} does not apply to the "
                                  f"{process!r} process; choose from {table[process]}")

    def keys(self, seeds) -> jax.Array:
        """One typed PRNG key per row from integer seeds."""
        return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


class _Unhashed:
    """Rides along an lru_cache call without being part of the key."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Unhashed)


@functools.lru_cache(maxsize=64)
def _jitted_step(fn, structure, mesh, table_items, static, graphdef: _Unhashed):
    """One jitted step per (function, model structure, mesh): engines built again for
    the same model (the trainer's periodic samples) reuse the compiled steps."""
    del structure  # the cache key; graphdef is what it stands for
    table, graphdef = dict(table_items), graphdef.value

    def run(state, cache, *args, **kwargs):
        cache_per_layer = isinstance(cache.k, PerLayer)
        state, cache = restack(state), restack(cache)
        with activation_sharding(mesh, table):
            out = fn(nnx.merge(graphdef, state), cache, *args, **kwargs)
        out = _host_readable(out, mesh)
        return per_layer_caches(out) if cache_per_layer else out

    return jax.jit(run, static_argnames=static, donate_argnums=(1,))


def _host_readable(out, mesh):
    """Every output but the KV cache replicated over the mesh. The host loop reads
    each step's tokens, logits and latents (small: [rows], [rows, V], [rows, H, W, C]);
    on a mesh that spans processes a sharded array is not readable by one process.
    Every process runs the same loop, so the gathers are collectives all join. Within
    one process the host reads sharded arrays itself: no gather per step."""
    if mesh is None or not mesh.is_multi_process:
        return out
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if isinstance(x, cache_lib.KVCache) or not isinstance(x, jax.Array):
            return x
        return jax.lax.with_sharding_constraint(x, replicated)

    return jax.tree.map(one, out, is_leaf=lambda x: isinstance(x, cache_lib.KVCache))


# --- per-layer storage of layer-stacked arrays ----------------------------------------
#
# The backbone's weights and KV cache are stacked over layers ([depth, ...], what a
# scanned layer loop needs). An unrolled loop reads layer i as `stack[i]`, and on
# XLA:CPU that slice is a copy: at cpu-s 109 MB of weights per diffusion step, inside
# the compiled sampler's loop as well, plus the cache sliced, updated and stacked
# again. Between calls the engine therefore keeps one array per layer (PerLayer) and
# re-stacks them inside the jitted step; XLA folds stack-then-slice back to the
# per-layer array, so each layer's matmuls read their weights where they lie and the
# cache's new columns are written in place (the buffers are donated).


class PerLayer(tuple):
    """The slices of one layer-stacked array, layer by layer (a pytree node)."""


jax.tree_util.register_pytree_node(PerLayer, lambda t: (tuple(t), None),
                                   lambda _, children: PerLayer(children))


def _stacked_over_layers(variable) -> bool:
    axes = variable.get_metadata().get("logical_axes") or ()
    return bool(axes) and axes[0] == "layers"


@jax.jit
def _split_layers(stack):
    # In a program, not eager slicing: a stack sharded over processes cannot be
    # iterated on one host. The layer axis is never sharded, so each slice keeps the
    # stack's sharding of the other axes.
    return PerLayer(stack[i] for i in range(stack.shape[0]))


def per_layer_weights(state):
    """The state with every layer-stacked parameter split into a PerLayer."""
    return jax.tree.map(
        lambda v: v.replace(_split_layers(v[...])) if _stacked_over_layers(v) else v,
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def per_layer_caches(tree):
    """Every KVCache in tree with k and v split per layer."""
    def split(c):
        return dataclasses.replace(c, k=PerLayer(c.k), v=PerLayer(c.v))
    return jax.tree.map(lambda x: split(x) if isinstance(x, cache_lib.KVCache) else x, tree,
                        is_leaf=lambda x: isinstance(x, cache_lib.KVCache))


def restack(tree):
    """Inverse of the two above (inside jit): each PerLayer stacked back into one array."""
    return jax.tree.map(lambda x: jnp.stack(x) if isinstance(x, PerLayer) else x, tree,
                        is_leaf=lambda x: isinstance(x, PerLayer))


def _call_with_state(jitted, engine, cache, *args, **kwargs):
    return jitted(engine.state, cache, *args, **kwargs)
