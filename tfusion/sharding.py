"""Mesh construction and THE logical-axis rule table.

Parameters and activations name their axes logically ("embed", "mlp", ...);
`LOGICAL_AXIS_RULES` maps each name to mesh axes. A different parallelism is a
different table (or a few overrides from config.mesh.rule_overrides), never
different model code. Mesh axes: data (pure data parallel), fsdp (data parallel
with parameters and optimizer state sharded), tensor (Megatron-style heads/mlp).

A mesh axis that does not divide the dimension its rule shards is an error
(`ShardingError`, naming the parameter path or activation, the logical axis and the
mesh axis), raised when the shardings are built (start-up) or the step is traced,
never a silent replication that costs memory at scale. The explicit opt-out is per
logical axis: `config.mesh.allow_replicated` (rule_table's `allow_replicated`), for
dimensions genuinely too small to shard (tiny test models); such a dimension is then
replicated over that mesh axis. `activation_batch` is always allowed: inference and
evaluation take whatever rows they get, and training batches are checked up front
(tfusion/train/validate.py validate_mesh_config names train.batch_size).
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
    # U-Net modality layers (~0.27B params at paper scale): ZeRO-3 over fsdp like the
    # backbone, on their channel axes (multiples of 64 in the paper configs; a spec
    # uses a mesh axis once, so each kernel is split on its first channel axis). The
    # latent-facing channel axis (C = 8) and the 3x3 taps are never sharded.
    ("unet_in", "fsdp"),
    ("unet_out", "fsdp"),
    ("unet_latent", None),
    ("conv_h", None),
    ("conv_w", None),
    # Autoencoders (tfusion/autoencoders) run outside the train step: replicated.
    ("vae_in", None),
    ("vae_out", None),
    ("vae_codebook", None),
)

# Reserved key of a rule table: the logical axes that may fall back to replication
# when a mesh axis does not divide them (a tuple, so tables stay hashable as items).
ALLOW_REPLICATED = "allow_replicated"
# Always allowed: batch rows (see the module docstring).
ALWAYS_REPLICABLE = ("activation_batch",)

_log = logging.getLogger(__name__)


class ShardingError(ValueError):
    """A rule cannot shard a dimension: the mesh axis does not divide it."""


def rule_table(overrides: Mapping[str, Any] | None = None,
               allow_replicated: Sequence[str] = ()) -> dict[str, Any]:
    """The rule table with config.mesh.rule_overrides applied; `allow_replicated`
    (config.mesh.allow_replicated) names the logical axes allowed to fall back to
    replication where a mesh axis does not divide them (anything else is an error)."""
    table = dict(LOGICAL_AXIS_RULES)
    for name, axes in (overrides or {}).items():
        if name not in table:
            raise ValueError(f"mesh.rule_overrides: unknown logical axis {name!r}")
        table[name] = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    if isinstance(allow_replicated, str):
        allow_replicated = (allow_replicated,)
    for name in allow_replicated:
        if name not in table:
            raise ValueError(f"mesh.allow_replicated: unknown logical axis {name!r}; "
                             f"known: {sorted(table)}")
    table[ALLOW_REPLICATED] = tuple(sorted(set(ALWAYS_REPLICABLE) | set(allow_replicated)))
    return table


def mesh_rules(mesh_config) -> dict[str, Any]:
    """rule_table of a config.mesh section (rule_overrides and allow_replicated)."""
    return rule_table(mesh_config.get("rule_overrides"), mesh_config.get("allow_replicated", ()))


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


def _axis_sizes(mesh) -> Mapping[str, int]:
    """Mesh axis sizes of a Mesh, an AbstractMesh or a plain {axis: size} mapping."""
    return mesh.shape if hasattr(mesh, "shape") else mesh


def logical_to_spec(logical_axes: Sequence[str | None], table: Mapping[str, Any],
                    shape: Sequence[int] | None = None, mesh=None, what: str | None = None
                    ) -> PartitionSpec:
    """Maps logical names to a PartitionSpec; a mesh axis is never used twice in one spec.

    With `shape` and `mesh` (a Mesh, AbstractMesh or {axis: size}), a mesh axis that
    does not divide its dimension raises ShardingError naming `what` (the parameter
    path or activation), the logical axis and the mesh axis, unless the logical axis
    is in the table's allow_replicated: then that dimension is replicated over it.
    """
    sizes = None if shape is None or mesh is None else _axis_sizes(mesh)
    allowed = table.get(ALLOW_REPLICATED, ALWAYS_REPLICABLE)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in table or name == ALLOW_REPLICATED:
            raise KeyError(f"logical axis {name!r} is not in the rule table (tfusion/sharding.py)")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        kept = []
        for axis in axes:
            if axis in used:
                continue
            if sizes is not None:
                ways = sizes[axis] * math.prod(sizes[a] for a in kept)
                if shape[dim] % ways:
                    if name in allowed:
                        continue
                    over = " x ".join(f"{a}={sizes[a]}" for a in (*kept, axis))
                    raise ShardingError(
                        f"{what or 'array'} {tuple(shape)} {tuple(logical_axes)}: dimension "
                        f"{dim} (logical axis {name!r}, size {shape[dim]}) is not divisible "
                        f"by mesh axis {axis!r} ({over} = {ways} ways). Change the size, the "
                        f"rule (config.mesh.rule_overrides.{name}) or replicate it explicitly "
                        f"(config.mesh.allow_replicated=({name!r},))")
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


def state_specs(state, mesh, table: Mapping[str, Any]):
    """PartitionSpec of every Variable of an (abstract) nnx.State, same tree structure.

    `mesh` may be abstract (an AbstractMesh or {axis: size}): the start-up check of a
    topology needs no devices. Raises ShardingError naming the parameter path."""

    def one(path, var):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            return PartitionSpec()
        return logical_to_spec(axes, table, var.shape, mesh,
                               what=f"param {jax.tree_util.keystr(path)}")

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def state_shardings(state, mesh: Mesh, table: Mapping[str, Any]):
    """NamedSharding for every Variable of an (abstract) nnx.State, same tree structure."""
    specs = state_specs(state, mesh, table)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


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


def constrain(x: jax.Array, logical_axes: Sequence[str | None], what: str = "activation"
              ) -> jax.Array:
    """Pins x to the active mesh; `what` names it in a ShardingError (raised at trace
    time when a mesh axis does not divide a dimension its rule shards)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, table = active
    spec = logical_to_spec(logical_axes, table, x.shape, mesh, what=what)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, table: Mapping[str, Any], ndim: int) -> NamedSharding:
    """Sharding of a batch array: leading axis over the batch mesh axes."""
    spec = logical_to_spec(("activation_batch",) + (None,) * (ndim - 1), table)
    return NamedSharding(mesh, spec)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


def describe_sizes(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{a}={sizes[a]}" for a in MESH_AXES if a in sizes)


def warn_replicated(state, mesh: Mesh, table: Mapping[str, Any]) -> None:
    """Logs parameters whose sharded axes fell back to replication: only logical axes
    in the table's allow_replicated may (any other raises ShardingError, by path)."""
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_variable):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            continue
        name = jax.tree_util.keystr(path)
        wanted = logical_to_spec(axes, table)
        got = logical_to_spec(axes, table, var.shape, mesh, what=f"param {name}")
        if wanted != got:
            _log.warning("param %s %s: sharding %s reduced to %s (dims not divisible; "
                         "allowed by mesh.allow_replicated)", name, var.shape, wanted, got)
