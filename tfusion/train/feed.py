"""The training input feed: the data iterator read on a background thread, ahead of the step.

Why a thread: the loop must stay responsive while the input pipeline is slow or
stalled (a SIGTERM with a grace period has to be answered with a checkpoint, not
ignored until the next batch arrives), and preparing batch n+1 (packing, the FLOP
count) overlaps step n instead of following it.

The thread runs numpy only: JAX work dispatched beside a running step (even a small
jnp op on one device) can starve one device's participant in the step's collectives,
and XLA:CPU then aborts the whole run. The trainer builds device arrays on its own
thread.

Exact resume survives the read-ahead: every batch travels with the iterator state
*after* it (and the iterator's cumulative data counts), and `state` / `data_counts`
describe the last batch handed to the loop, not the last one read. A checkpoint
written after step n therefore restarts the pipeline at batch n + 1.

Iterator protocol (any object; the trainer never imports the data pipeline):
`next()`, `get_state()` / `set_state()` (JSON-able), optionally `data_counts()`
(cumulative `data_*` counters: records read, skipped and repaired by reason) and
`close()`.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

_POLL_S = 0.1  # how often a waiting loop re-checks its interrupt flag


def data_counts(iterator) -> dict:
    """The iterator's cumulative data counters ({} when it keeps none)."""
    counts = getattr(iterator, "data_counts", None)
    return dict(counts()) if counts else {}


class _Failure:
    """An exception raised by the iterator, re-raised in the consumer's thread."""

    def __init__(self, error: BaseException):
        self.error = error


class BatchFeed:
    """Reads `iterator` on a daemon thread, at most `ahead` batches ahead of the loop.

    `prepare(local_batch)` runs on the feed thread too (host-side numpy work, e.g.
    counting the batch's FLOPs), so its cost also overlaps the running step.
    """

    def __init__(self, iterator, *, ahead: int = 1, prepare: Optional[Callable] = None):
        self._iterator = iterator
        self._prepare = prepare or (lambda batch: batch)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self.state = iterator.get_state()  # after the last batch handed out
        self.data_counts = data_counts(iterator)
        self._thread = threading.Thread(target=self._read, name="tfusion-batch-feed", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                local = next(self._iterator)
                item: Any = (self._prepare(local), self._iterator.get_state(),
                             data_counts(self._iterator))
            except BaseException as e:  # StopIteration included: the consumer decides
                item = _Failure(e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, _Failure):
                return

    def next(self, interrupted: Callable[[], bool] = lambda: False):
        """The next prepared batch; None if `interrupted()` turns true while waiting.

        Re-raises what the iterator raised (StopIteration at the end of a finite one).
        """
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if interrupted():
                    return None
                continue
            if isinstance(item, _Failure):
                raise item.error
            batch, self.state, self.data_counts = item
            return batch

    def close(self, timeout_s: float = 5.0) -> bool:
        """Stops the thread and closes the iterator; False (iterator left open) when the
        thread is stuck inside the iterator, which must not be closed under it."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            return False
        close = getattr(self._iterator, "close", None)
        if close:
            close()
        return True
