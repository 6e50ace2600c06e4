"""Orbax checkpoints: the train state and every process's data-iterator state, together.

Layout: workdir/checkpoints/<step>/{state, data}. `state` is the whole train state
pytree (params, optimizer state, step, RNG, non-finite counters); `data` is JSON
{"process_count": P, "iterators": [state of process 0, ..., P-1]}. Saving is async:
the device->host copy happens in save(), the writes in the background, so the
(donated) state can be updated by the next step right away. Orbax writes each step
to a temporary directory and renames it when complete, so a run killed mid-save
resumes from the previous complete checkpoint.

Where only some of the state is needed (the params or their EMA for sampling,
evaluation and export), `restore_entries` reads just those top-level entries of
`state` (orbax partial restore): the optimizer moments are never read.
A params-only checkpoint (launch.export) has a `state` item alone.

Faults (docs/reliability.md): a checkpoint that cannot be read (a file truncated or
missing after it was finalised) is moved aside to checkpoints_unreadable/<step> and
the previous one is restored, with a warning naming both; a save that fails (disk
full, unwritable directory) raises CheckpointSaveError naming the step, the cause and
the newest complete checkpoint, which orbax's write-then-rename left untouched.
"""
from __future__ import annotations

import logging
import os
import re
import shutil

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

_log = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the previous checkpoints are intact."""


class NoRestorableCheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be read."""


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data"))
        self._last_saved: int | None = None
        self._closed = False

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: dict, iterator_states: list | None) -> None:
        """Saves unless `step` is already saved (e.g. a SIGTERM right after a periodic save).
        iterator_states None: the `state` item alone (a params-only export).

        An error of the previous (async) save surfaces here, or in wait()/close()."""
        if step == self._last_saved or step in self._manager.all_steps():
            return
        self.check_for_errors()
        previous, self._last_saved = self._last_saved, step
        items = dict(state=ocp.args.StandardSave(state))
        if iterator_states is not None:
            items["data"] = ocp.args.JsonSave(
                {"process_count": len(iterator_states), "iterators": iterator_states})
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            self._last_saved = previous
            raise self._save_error(step, e) from e

    def _save_error(self, step: int, cause: Exception) -> CheckpointSaveError:
        complete = [s for s in self._manager.all_steps() if s != step]
        newest = f"step {max(complete)}" if complete else "none"
        return CheckpointSaveError(
            f"could not write checkpoint step {step} to {self.directory}: "
            f"{_os_reason(cause)} ({type(cause).__name__}: {short_error(cause)}). Newest "
            f"complete checkpoint: {newest} (intact)")

    def check_for_errors(self) -> None:
        """Raises CheckpointSaveError if a background save has failed."""
        try:
            self._manager.check_for_errors()
        except Exception as e:
            raise self._save_error(self._last_saved, e) from e

    def restore_latest(self, target: dict) -> tuple[int, dict, dict] | None:
        """(step, state, data) of the newest readable checkpoint; None when there is none.

        When a newer checkpoint fails and an older one restores into the same target,
        the newer one is broken (not the target): it is moved aside, so a later save of
        its step is not skipped as already present. When none restores, nothing is
        moved (the config, not the files, is the likelier cause) and the error says so.
        """
        steps = sorted(self.all_steps(), reverse=True)
        failures: list[tuple[int, Exception]] = []
        for step in steps:
            try:
                state, data = self.restore(step, target)
            except Exception as e:  # orbax/tensorstore raise many types for broken files
                failures.append((step, e))
                continue
            for bad_step, error in failures:
                self._move_aside(bad_step, error)
            if failures:
                _log.warning("checkpoint step %s unreadable: resumed from step %d instead "
                             "(%s)", ", ".join(str(f[0]) for f in failures), step,
                             self.directory)
            return step, state, data
        if failures:
            step, error = failures[0]
            raise NoRestorableCheckpointError(
                f"no checkpoint in {self.directory} could be restored (steps {steps}); "
                f"step {step}: {type(error).__name__}: {short_error(error)}")
        return None

    def _aside_dir(self) -> str:
        return self.directory.rstrip("/") + "_unreadable"

    def _move_aside(self, step: int, error: Exception) -> None:
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self._aside_dir(), f"{step}")
        _log.warning("checkpoint step %d in %s cannot be read (%s: %s); moving it to %s",
                     step, self.directory, type(error).__name__, short_error(error), target)
        # The primary process moves it; every process waits until it is gone.
        if jax.process_index() == 0 and os.path.isdir(source):
            os.makedirs(self._aside_dir(), exist_ok=True)
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint_moved_aside_{step}")
        self._manager.reload()

    def restore(self, step: int, target: dict) -> tuple[dict, dict]:
        """(state, data) at `step`; arrays land in `target`'s shardings (any mesh)."""
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def saved_entries(self, step: int) -> list[str]:
        """Top-level keys of the state saved at `step` ("params", "opt_state", ...), from
        its tree metadata: no array is read."""
        path = epath.Path(self.directory) / str(step) / "state"
        return sorted(ocp.PyTreeCheckpointHandler().metadata(path).tree.keys())

    def restore_entries(self, step: int, target: dict) -> dict:
        """The top-level entries of the saved state that `target` names (e.g.
        {"ema_params": ShapeDtypeStructs with their shardings}), straight into those
        shardings; nothing else of the checkpoint (optimizer state, data) is read."""
        args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)
        return self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]

    def wait(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(self._last_saved, e) from e

    def close(self) -> None:
        """Waits for the last save (raising its error) and releases orbax; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
        finally:
            self._manager.close()


def _os_reason(error: BaseException) -> str:
    """The operating system's words for a failed write, wherever orbax/tensorstore put
    them in the exception chain ("File too large", "No space left on device")."""
    while error is not None:
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        found = re.search(r"os_error_code='?(\d+)", str(error))
        if found:  # tensorstore appends the errno to messages of many shapes
            return os.strerror(int(found.group(1)))
        error = error.__cause__ or error.__context__
    return "disk full or directory not writable?"


def short_error(error: Exception, limit: int = 320) -> str:
    """orbax errors carry whole tensorstore specs: the first line, with its middle cut
    when long (the head says what was written, the tail why it failed)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    half = limit // 2
    return text if len(text) <= limit else f"{text[:half]} ... {text[-half:]}"


def iterator_state_for(data: dict, process_index: int, process_count: int):
    """This process's saved iterator state, or None when the process count changed
    (the data order depends on it, so the stream cannot be continued exactly)."""
    if data.get("process_count") != process_count:
        _log.warning("checkpoint data state is for %s processes, this run has %d: "
                     "the data iterators restart from the beginning",
                     data.get("process_count"), process_count)
        return None
    return data["iterators"][process_index]
