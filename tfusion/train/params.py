"""Building Transfusion parameters: abstractly (counting), or directly sharded on a mesh."""
from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import Mesh

from tfusion import sharding
from tfusion.model.transfusion import Transfusion


def abstract_model(model_cfg, seed: int = 0):
    """(graphdef, abstract params) with ShapeDtypeStructs: nothing is allocated."""
    model = nnx.eval_shape(lambda: Transfusion(model_cfg, rngs=nnx.Rngs(seed)))
    return nnx.split(model)


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
        return nnx.state(Transfusion(model_cfg, rngs=nnx.Rngs(seed)))

    if mesh is None:
        return graphdef, jax.jit(create)()
    shardings = sharding.state_shardings(abstract, mesh, table)
    sharding.warn_replicated(abstract, mesh, table)
    return graphdef, jax.jit(create, out_shardings=shardings)()
