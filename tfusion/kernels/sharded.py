"""Runs a per-shard attention kernel under the active mesh with shard_map.

GSPMD cannot partition a pallas_call (it would gather the operands onto every
device), so kernels run per shard: batch over the batch mesh axes
("activation_batch"), heads over "activation_heads". Attention is independent
per (row, head), so no collective is needed. Query and kv heads are split over
the same axes or not at all: with GQA the local query heads must map onto the
local kv heads, which holds iff both counts divide by the head shards.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from tfusion import sharding


def _spec_axes(spec: P):
    return spec[0] if len(spec) else None


def shard_over_mesh(kernel: Callable) -> Callable:
    """kernel(q, k, v, info) -> out, made mesh-aware (identity without a mesh)."""

    def run(q, k, v, info):
        active = sharding.active_sharding()
        if active is None:
            return kernel(q, k, v, info)
        mesh, table = active
        batch = _spec_axes(sharding.logical_to_spec(("activation_batch",), table,
                                                    (q.shape[0],), mesh))
        heads = _spec_axes(sharding.logical_to_spec(("activation_heads",), table,
                                                    (q.shape[2],), mesh))
        kv_heads = _spec_axes(sharding.logical_to_spec(("activation_heads",), table,
                                                       (k.shape[2],), mesh))
        if heads != kv_heads:
            heads = kv_heads = None
        q_spec, kv_spec = P(batch, None, heads, None), P(batch, None, kv_heads, None)
        info_spec = jax.tree.map(lambda _: P(batch, None), info)
        return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, info_spec),
                             out_specs=q_spec, check_vma=False)(q, k, v, info)

    return run
