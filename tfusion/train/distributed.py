"""Multi-host set-up and per-process data -> global arrays.

`initialize` picks, in order: explicit coordinator settings (flags, or env
TFUSION_COORDINATOR_ADDRESS / TFUSION_NUM_PROCESSES / TFUSION_PROCESS_ID), a SLURM
job with several tasks, a multi-host TPU slice; otherwise it stays single-process.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from tfusion import sharding

_log = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else None


def _is_multihost_tpu() -> bool:
    # TPU VMs of a multi-host slice list all workers' hostnames here.
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def _is_multitask_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize(coordinator_address: str = "", num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str = "gloo") -> str:
    """Calls jax.distributed.initialize when the run spans processes; returns how."""
    coordinator_address = coordinator_address or os.environ.get("TFUSION_COORDINATOR_ADDRESS", "")
    num_processes = num_processes if num_processes is not None else _env_int("TFUSION_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("TFUSION_PROCESS_ID")
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("a coordinator address needs num_processes and process_id "
                             "(flags or TFUSION_NUM_PROCESSES / TFUSION_PROCESS_ID)")
        how = "explicit"
    elif _is_multitask_slurm():
        how = "slurm"
    elif _is_multihost_tpu():
        how = "tpu"
    else:
        return "single-process"
    # CPU processes need a collectives backend to talk to each other (tests, CPU clusters).
    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or (jax.config.jax_platforms or "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if how == "explicit":
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()  # jax's cluster auto-detection (SLURM, TPU metadata)
    _log.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", how,
              jax.process_index(), jax.process_count(), jax.local_device_count(),
              jax.device_count())
    return how


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, table) -> dict:
    """This process's rows -> global jax arrays, rows sharded over the batch mesh axes.

    Process p's rows become global rows [p * B_local, (p + 1) * B_local) (devices are
    ordered by process in the mesh), so the global batch is the process batches
    concatenated in process order.
    """
    count = jax.process_count()
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        target = sharding.batch_sharding(mesh, table, value.ndim)
        shape = (value.shape[0] * count,) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(target, value, shape)
    return out


def allgather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order (identical on all processes)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode())
            for row, n in zip(np.asarray(gathered), np.asarray(sizes).reshape(-1))]


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (e.g. a SIGTERM on one host)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))
