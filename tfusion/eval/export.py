"""Params-only copies of a run (launch.export): no optimizer state, no data state.

  export_orbax(workdir, out)        out/config.json, out/export.json and
                                    out/checkpoints/<step>/state = {"params": ...}: a
                                    run directory load_model (launch.generate,
                                    launch.evaluate) reads like the run itself, and what
                                    a train.init_from restores ("params" entry,
                                    Checkpointer.restore_entries)
  export_safetensors(workdir, out)  out/model.safetensors (flat dotted names, e.g.
                                    backbone.blocks.attn.qkv.kernel; float32) beside
                                    out/config.json and out/export.json

The params are restored sharded on the run's mesh (only the chosen entry is read).
Orbax writes each shard from the process that holds it. A safetensors file is one
host's file: its tensors are materialised on the host one at a time and streamed to
the file, so at most one whole tensor is ever held there.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Optional

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from tfusion.eval.checkpoints import EXPORT_FILE, load_config, restore_params

FORMATS = ("orbax", "safetensors")
SAFETENSORS_FILE = "model.safetensors"
_DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
                np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}


class ExportExistsError(FileExistsError):
    """The output directory already holds an export or a run."""


def flat_names(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {"a.b.c": leaf} in sorted order."""
    out = {}
    for key in sorted(tree, key=str):
        name = f"{prefix}.{key}" if prefix else str(key)
        value = tree[key]
        if isinstance(value, dict):
            out.update(flat_names(value, name))
        else:
            out[name] = value
    return out


def _host_value(x: jax.Array) -> np.ndarray:
    """One whole tensor on this host. Sharded over processes it is gathered, a
    collective every process joins (in the same tensor order)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _header(tensors: dict[str, jax.Array], metadata: dict[str, str]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name, x in tensors.items():
        dtype = np.dtype(x.dtype)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name here")
        size = int(np.prod(x.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def write_safetensors(path: str, tensors: dict[str, jax.Array], metadata: dict[str, str]
                      ) -> None:
    """Streams `tensors` (name -> array, in this order) into a safetensors file, one
    tensor on the host at a time. Every process calls it; the primary writes."""
    primary = jax.process_index() == 0
    f = open(path + ".tmp", "wb") if primary else None
    try:
        if f is not None:
            header = _header(tensors, metadata)
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
        for x in tensors.values():
            value = _host_value(x)
            if f is not None:
                f.write(np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"),
                                                          copy=False).tobytes())
            del value
    finally:
        if f is not None:
            f.close()
    if primary:
        os.replace(path + ".tmp", path)  # a killed export leaves no half file


def _prepare(out: str) -> None:
    if os.path.exists(os.path.join(out, "checkpoints")) or \
            os.path.exists(os.path.join(out, SAFETENSORS_FILE)):
        raise ExportExistsError(f"{out} already holds an export or a run; choose another --out")
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)


def _write_run_files(workdir: str, out: str, info: dict) -> None:
    if jax.process_index() != 0:
        return
    shutil.copyfile(os.path.join(workdir, "config.json"), os.path.join(out, "config.json"))
    with open(os.path.join(out, EXPORT_FILE), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)


def export(workdir: str, out: str, params: str = "ema", fmt: str = "orbax",
           step: Optional[int] = None, devices=None) -> dict:
    """Writes the run's params (see the module docstring); returns export.json's dict:
    {"params": "ema"|"raw" (what was read), "step", "format", "source", "tensors"}."""
    if fmt not in FORMATS:
        raise ValueError(f"format: unknown {fmt!r}; choose from {FORMATS}")
    config = load_config(workdir)
    tree, step, entry = restore_params(workdir, step, config, params, devices)
    _prepare(out)
    info = {"params": "ema" if entry == "ema_params" else "raw", "step": step,
            "format": fmt, "source": os.path.abspath(workdir),
            "tensors": len(jax.tree.leaves(tree))}
    if fmt == "orbax":
        from tfusion.train.checkpoint import Checkpointer

        checkpointer = Checkpointer(os.path.join(out, "checkpoints"), keep=1, async_save=False)
        try:
            checkpointer.save(step, {"params": tree}, None)
        finally:
            checkpointer.close()
    else:
        metadata = {"format": "tfusion", "params": info["params"], "step": str(step)}
        write_safetensors(os.path.join(out, SAFETENSORS_FILE), flat_names(tree), metadata)
    _write_run_files(workdir, out, info)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tfusion_export_done")
    return info
