"""The train state: one dict pytree that is jitted, donated, sharded and checkpointed whole.

  step            int32 []   optimizer steps taken (skipped non-finite steps count too,
                             so step N always consumed data batches 0..N-1)
  params          pure dict of the model's nnx parameters (nnx.merge takes it as is)
  ema_params      (only with train.ema_decay > 0) the exponential moving average of
                  params, same tree and shardings; what sampling and evaluation use
  opt_state       optax state; moments sharded exactly like params
  rng             uint32 key data of the run's base key; step keys are
                  fold_in(base, step), so a resumed run draws the same noise
  nonfinite_run   int32 []   consecutive skipped (non-finite) steps up to now
  nonfinite_total int32 []   all skipped steps of the run
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfusion import sharding
from tfusion.train.params import abstract_model, init_params, stream_keys

SCALAR_KEYS = ("step", "nonfinite_run", "nonfinite_total")


def to_pure(tree):
    """nnx.State (Variables or per-Variable values) -> plain nested dict of values."""
    return tree.to_pure_dict() if hasattr(tree, "to_pure_dict") else tree


def base_key(seed: int) -> jax.Array:
    """uint32 key data of the run's training-noise stream (stored in the state)."""
    return jax.random.key_data(stream_keys(seed)["noise"])


def step_key(state_rng: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state_rng), step)


def uses_ema(config) -> bool:
    return float(config.train.get("ema_decay", 0.0)) > 0.0


def train_state_shardings(model_cfg, tx: optax.GradientTransformation, mesh: Mesh,
                          table: Mapping[str, Any], ema: bool = False) -> dict:
    """NamedShardings of the whole state: optimizer moments and the EMA follow their
    parameter."""
    graphdef, abstract = abstract_model(model_cfg)
    param_sh = to_pure(sharding.state_shardings(abstract, mesh, table))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = opt_state_shardings(tx, to_pure(abstract), param_sh, replicated)
    out = dict(params=param_sh, opt_state=opt_sh, rng=replicated)
    if ema:
        out["ema_params"] = param_sh
    out.update({k: replicated for k in SCALAR_KEYS})
    return out


def opt_state_shardings(tx, params: dict, param_sh: dict, replicated) -> dict:
    """Each optimizer-state leaf sharded like the param it belongs to: the param whose
    key path ends the leaf's (Adam's mu/nu hold a copy of the param tree, also inside
    optax.multi_transform, whose frozen params have no state); other leaves (counts)
    replicated."""
    by_path = {tuple(map(str, path)): sh
               for path, sh in jax.tree_util.tree_flatten_with_path(param_sh)[0]}

    def one(path, leaf):
        keys = tuple(map(str, path))
        for start in range(len(keys)):
            sh = by_path.get(keys[start:])
            if sh is not None:
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, params))


def abstract_params(model_cfg, mesh: Mesh, table: Mapping[str, Any]) -> dict:
    """ShapeDtypeStructs of the params (pure dict) in their shardings on `mesh`: the
    restore target where only the params are needed (load_model, export)."""
    _, abstract = abstract_model(model_cfg)
    shardings = to_pure(sharding.state_shardings(abstract, mesh, table))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        to_pure(abstract), shardings)


def abstract_state(model_cfg, tx, shardings: dict) -> dict:
    """ShapeDtypeStructs with shardings: the restore target for orbax."""
    _, abstract = abstract_model(model_cfg)
    params = to_pure(abstract)
    shapes = dict(params=params, opt_state=jax.eval_shape(tx.init, params),
                  rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    if "ema_params" in shardings:
        shapes["ema_params"] = params
    shapes.update({k: jax.ShapeDtypeStruct((), jnp.int32) for k in SCALAR_KEYS})
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def init_state(model_cfg, tx, mesh: Mesh, table, seed: int, shardings: dict):
    """(graphdef, state) with everything created directly in its sharding; the state
    has ema_params when `shardings` does."""
    graphdef, params = init_params(model_cfg, mesh, table, seed)
    params = to_pure(params)

    def rest(p):
        out = dict(opt_state=tx.init(p), rng=base_key(seed))
        if "ema_params" in shardings:  # starts at the initial params (a copy: donation)
            out["ema_params"] = jax.tree.map(jnp.copy, p)
        out.update({k: jnp.zeros((), jnp.int32) for k in SCALAR_KEYS})
        return out

    rest_sh = {k: v for k, v in shardings.items() if k != "params"}
    state = jax.jit(rest, out_shardings=rest_sh)(params)
    state["params"] = params
    return graphdef, state
