"""The one timing loop of the jax benchmarks: untimed warm-up calls, then calls each
blocked on (jax dispatch is asynchronous) and timed on their own."""
from __future__ import annotations

import time
from typing import Any, Callable


def timed_calls(call: Callable[[int], Any], warmup: int, steps: int):
    """Runs call(0) .. call(warmup + steps - 1); returns (seconds of each timed call,
    seconds of the whole warm-up, the last call's result)."""
    import jax

    start = time.perf_counter()
    result = None
    for i in range(warmup):
        result = jax.block_until_ready(call(i))
    warmup_s = time.perf_counter() - start
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        result = jax.block_until_ready(call(i))
        times.append(time.perf_counter() - start)
    return times, warmup_s, result


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine entry of a result."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def write_result(path: str, result: dict) -> None:
    """Writes a benchmark's result JSON (creating its folder) and says where."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
