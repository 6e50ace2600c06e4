"""Peak FLOP/s per device (for MFU) by jax `device_kind`, or measured once on CPU.

Table values are dense bf16 peak per *jax device* (a TPU v4/v5p megacore chip is
one device; v5e/v6e expose one core per chip). Sources: vendor spec sheets.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time

import jax
import jax.numpy as jnp

_log = logging.getLogger(__name__)

# Lower-cased substring of device_kind -> peak FLOP/s (dense bf16, no sparsity).
PEAK_FLOPS = (
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e reports "TPU v5 lite"
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p may report plain "TPU v5"
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("h100", 989e12),  # SXM; PCIe parts are ~756e12
    ("h200", 989e12),
    ("a100", 312e12),
)

_CACHE_FILE = os.path.join(os.path.expanduser("~"), ".cache", "tfusion", "cpu_peak_flops.json")


def lookup_peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    return None


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Achieved float32 matmul FLOP/s of one device: the CPU 'peak' we compare against."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def cpu_identity() -> str:
    """What the cached measurement holds for: the CPU model, its cores and the jax CPU
    devices they are split into (a home directory can outlive its machine)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} | {os.cpu_count()} cores | {jax.local_device_count()} devices"


def cpu_peak_flops(cache_file: str = _CACHE_FILE) -> float:
    """Measured once per machine (cpu_identity) and cached (the measurement takes ~1 s);
    a cache written on another machine is measured again."""
    identity = cpu_identity()
    try:
        with open(cache_file) as f:
            cached = json.load(f)
        if cached.get("machine") == identity:
            return float(cached["flops"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    flops = measure_matmul_flops()
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        with open(cache_file, "w") as f:
            json.dump({"flops": flops, "machine": identity}, f)
    except OSError:
        pass
    return flops


def peak_flops_per_device(configured: float = 0.0) -> float:
    """config.train.peak_flops_per_device if > 0, else the table, else measured (CPU)."""
    if configured > 0:
        return float(configured)
    device = jax.devices()[0]
    peak = lookup_peak_flops(device.device_kind)
    if peak is not None:
        return peak
    if device.platform != "cpu":
        _log.warning("unknown device kind %r: MFU is measured against a float32 matmul",
                     device.device_kind)
    return cpu_peak_flops()


def mfu(step_flops: float, step_seconds: float, num_devices: int, peak_per_device: float
        ) -> float:
    return step_flops / max(step_seconds, 1e-12) / (num_devices * peak_per_device)
