"""Loss and gradients of one batch, jitted with explicit shardings."""
from __future__ import annotations

from typing import Any, Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfusion import sharding
from tfusion.objective import Objective


def batch_shardings(mesh: Mesh, table: Mapping[str, Any], batch_ndims: Mapping[str, int]):
    return {k: sharding.batch_sharding(mesh, table, batch_ndims[k]) for k in batch_ndims}


def make_loss_and_grad(objective: Objective, mesh: Mesh, table, param_shardings,
                       batch_ndims: Mapping[str, int]):
    """jit(params, batch, rng) -> ((loss, aux), grads) with grads sharded like params."""

    def loss_and_grad(params, batch, rng):
        with sharding.activation_sharding(mesh, table):
            return jax.value_and_grad(objective.loss, has_aux=True)(params, batch, rng)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        loss_and_grad,
        in_shardings=(param_shardings, batch_shardings(mesh, table, batch_ndims), replicated),
        out_shardings=((replicated, replicated), param_shardings),
    )

