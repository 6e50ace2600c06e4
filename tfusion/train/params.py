"""Building Transfusion parameters: abstractly (counting), or directly sharded on a mesh."""
from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh

from tfusion import sharding
from tfusion.model.transfusion import Transfusion


RNG_STREAMS = ("params", "noise", "eval")


def stream_keys(seed: int) -> dict[str, jax.Array]:
    """The run's random streams, split once from key(seed) by name: parameter init,
    training noise (step s draws from fold_in(noise, s)) and held-out evaluation noise.

    Every consumer derives its keys from its own stream only. Deriving them from
    key(seed) by small integers instead collides, because split(k, n)[j] equals
    fold_in(k, j): nnx.Rngs(seed) split its key 1 over the layers, so layer j's
    weights were drawn from the very key train step j drew its timesteps and noise
    from (tests/train/test_train_rng.py).
    """
    keys = jax.random.split(jax.random.key(seed), len(RNG_STREAMS))
    return dict(zip(RNG_STREAMS, keys))


def _model(model_cfg, seed: int) -> Transfusion:
    return Transfusion(model_cfg, rngs=nnx.Rngs(stream_keys(seed)["params"]))


def abstract_model(model_cfg, seed: int = 0):
    """(graphdef, abstract params) with ShapeDtypeStructs: nothing is allocated."""
    return nnx.split(nnx.eval_shape(lambda: _model(model_cfg, seed)))


def count_params(abstract_params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))


def count_params_by_part(abstract_params) -> dict[str, int]:
    """Parameter counts per top-level module (backbone, embed, image layers, ...)."""
    out: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        out[str(path[0].key)] = out.get(str(path[0].key), 0) + math.prod(leaf.shape)
    return out


def init_params(model_cfg, mesh: Mesh | None, table, seed: int):
    """(graphdef, params) with every parameter created directly in its sharding."""
    graphdef, abstract = abstract_model(model_cfg, seed)

    def create():
        return nnx.state(_model(model_cfg, seed))

    if mesh is None:
        return graphdef, jax.jit(create)()
    shardings = sharding.state_shardings(abstract, mesh, table)
    sharding.warn_replicated(abstract, mesh, table)
    return graphdef, jax.jit(create, out_shardings=shardings)()
