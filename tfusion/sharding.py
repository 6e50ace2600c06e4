"""Mesh construction and THE logical-axis rule table.

Parameters and activations name their axes logically ("embed", "mlp", ...);
`LOGICAL_AXIS_RULES` maps each name to mesh axes. A different parallelism is a
different table (or a few overrides from config.mesh.rule_overrides), never
different model code. Mesh axes: data (pure data parallel), fsdp (data parallel
with parameters and optimizer state sharded), tensor (Megatron-style heads/mlp).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # --- activations ---
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # --- parameters ---
    ("layers", None),  # the stacked-layer axis is scanned over, never sharded
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("patch", None),  # k*k*C patch vector of the linear modality layer
    ("timestep", None),
    # U-Net modality layers are small next to the backbone: replicated.
    ("unet_in", None),
    ("unet_out", None),
    ("conv_h", None),
    ("conv_w", None),
    # Autoencoders (tfusion/autoencoders) run outside the train step: replicated.
    ("vae_in", None),
    ("vae_out", None),
    ("vae_codebook", None),
)

_log = logging.getLogger(__name__)


def rule_table(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    table = dict(LOGICAL_AXIS_RULES)
    for name, axes in (overrides or {}).items():
        if name not in table:
            raise ValueError(f"mesh.rule_overrides: unknown logical axis {name!r}")
        table[name] = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    return table


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves the one -1 axis so the product equals the device count."""
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {fill}")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"config.mesh.{bad[0]}: size must be positive or -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"config.mesh.{fill[0]}: {num_devices} devices are not "
                             f"divisible by the other axes' product {known}")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"config.mesh: axis sizes {sizes} need {math.prod(sizes.values())} "
                         f"devices, have {num_devices}")
    return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices == list(jax.devices()):
        device_array = mesh_utils.create_device_mesh(shape, devices)
    else:
        device_array = np.asarray(devices).reshape(shape)
    # Auto axes: classic GSPMD propagation (jax 0.10 defaults to Explicit).
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[str | None], table: Mapping[str, Any],
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None
                    ) -> PartitionSpec:
    """Maps logical names to a PartitionSpec.

    With `shape` and `mesh`, mesh axes that do not divide a dimension are dropped
    (that dimension is replicated over them), so tiny test models shard whatever
    divides; a mesh axis is never used twice in one spec.
    """
    used: set[str] = set()
    out = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} is not in the rule table (tfusion/sharding.py)")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        kept = []
        for axis in axes:
            if axis in used:
                continue
            if shape is not None and mesh is not None:
                size = mesh.shape[axis] * math.prod(mesh.shape[a] for a in kept)
                if shape[dim] % size:
                    continue
            kept.append(axis)
        used.update(kept)
        out.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*out)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_logical_axes(state) -> Any:
    """The `logical_axes` metadata of every Variable of an nnx.State."""
    return jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), state,
                        is_leaf=_is_variable)


def state_shardings(state, mesh: Mesh, table: Mapping[str, Any]):
    """NamedSharding for every Variable of an (abstract) nnx.State, same tree structure."""

    def one(var):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            return NamedSharding(mesh, PartitionSpec())
        spec = logical_to_spec(axes, table, var.shape, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=_is_variable)


# The mesh and table used by `constrain` while tracing a step.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("tfusion_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, table: Mapping[str, Any]):
    """Inside, `constrain` pins activations to the mesh; outside it is a no-op."""
    token = _ACTIVE.set(None if mesh is None else (mesh, table))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_sharding() -> tuple[Mesh, Mapping[str, Any]] | None:
    """(mesh, table) while tracing inside `activation_sharding`, else None; kernels
    that need per-shard code (shard_map) read it."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, table = active
    spec = logical_to_spec(logical_axes, table, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, table: Mapping[str, Any], ndim: int) -> NamedSharding:
    """Sharding of a batch array: leading axis over the batch mesh axes."""
    spec = logical_to_spec(("activation_batch",) + (None,) * (ndim - 1), table)
    return NamedSharding(mesh, spec)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


def warn_replicated(state, mesh: Mesh, table: Mapping[str, Any]) -> None:
    """Logs parameters whose sharded axes fell back to replication (non-divisible)."""
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_variable):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            continue
        wanted = logical_to_spec(axes, table)
        got = logical_to_spec(axes, table, var.shape, mesh)
        if wanted != got:
            _log.warning("param %s %s: sharding %s reduced to %s (dims not divisible)",
                         jax.tree_util.keystr(path), var.shape, wanted, got)
