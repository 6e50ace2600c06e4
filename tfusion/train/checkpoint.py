"""Orbax checkpoints: the train state and every process's data-iterator state, together.

Layout: workdir/checkpoints/<step>/{state, data}. `state` is the whole train state
pytree (params, optimizer state, step, RNG, non-finite counters); `data` is JSON
{"process_count": P, "iterators": [state of process 0, ..., P-1]}. Saving is async:
the device->host copy happens in save(), the writes in the background, so the
(donated) state can be updated by the next step right away. Orbax writes each step
to a temporary directory and renames it when complete, so a run killed mid-save
resumes from the previous complete checkpoint.
"""
from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp

_log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data"))
        self._last_saved: int | None = None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: dict, iterator_states: list) -> None:
        """Saves unless `step` is already saved (e.g. a SIGTERM right after a periodic save)."""
        if step == self._last_saved or step in self._manager.all_steps():
            return
        self._last_saved = step
        data = {"process_count": len(iterator_states), "iterators": iterator_states}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)

    def restore(self, step: int, target: dict) -> tuple[dict, dict]:
        """(state, data) at `step`; arrays land in `target`'s shardings (any mesh)."""
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def iterator_state_for(data: dict, process_index: int, process_count: int):
    """This process's saved iterator state, or None when the process count changed
    (the data order depends on it, so the stream cannot be continued exactly)."""
    if data.get("process_count") != process_count:
        _log.warning("checkpoint data state is for %s processes, this run has %d: "
                     "the data iterators restart from the beginning",
                     data.get("process_count"), process_count)
        return None
    return data["iterators"][process_index]
