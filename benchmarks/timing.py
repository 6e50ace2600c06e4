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
