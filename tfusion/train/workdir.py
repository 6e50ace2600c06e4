"""Guards of a run directory: one trainer at a time, and resumes with the run's own model.

`WorkdirLock`: an exclusive `flock` on workdir/train.lock, held for the whole run by
the primary process, so two trainers never write checkpoints into one workdir. The
kernel drops the lock when its process dies (crash, SIGKILL), so a dead run's lock
is taken over (with a log line naming the old owner); a live owner's pid and host
are in the refusal. The file's content is informative only; the flock decides.

`check_resume_config`: a restart whose model would not fit the checkpoints (another
width, depth, patch size, ...) fails before anything is compiled, naming the field
and both values, instead of deep inside orbax with a shape mismatch.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

from tfusion.config import ConfigError, padded_vocab

_log = logging.getLogger("tfusion.train")

LOCK_FILE = "train.lock"

# Model fields that may change between a run and its restart: they change how the
# same parameters are computed with, not what the parameters are.
RESUMABLE_MODEL_FIELDS = frozenset({"dtype", "remat_policy", "attention_kernel"})


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the workdir."""


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._file = None

    def acquire(self) -> "WorkdirLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(f)
            f.close()
            raise WorkdirLockedError(
                f"workdir {os.path.dirname(self.path)} is locked by another trainer "
                f"(pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, since "
                f"{owner.get('since', '?')}); stop it or use another --workdir") from None
        previous = _read_owner(f)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            _log.warning("taking over the lock of a finished trainer (pid %s on host %s): %s",
                         previous.get("pid"), previous.get("host"), self.path)
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()  # a clean exit leaves no owner behind
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_owner(f) -> dict:
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except ValueError:
        return {}


def check_resume_config(workdir: str, config) -> None:
    """Raises ConfigError if the run in `workdir` (its config.json) has another model.

    Lists compare as tuples (config.json stores tuples as lists). Only fields known to
    both are compared: a field added to the code since the run started has its
    default. A workdir without a config.json is a new run; the caller checks only when
    checkpoints exist.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    saved_model = saved.get("model", {})
    for field in sorted(set(saved_model) & set(config.model.keys())):
        if field in RESUMABLE_MODEL_FIELDS or field == "padded_vocab_size":
            continue
        old, new = saved_model.get(field), config.model.get(field)
        if _plain(old) != _plain(new):
            raise ConfigError(f"model.{field}", f"the run in {workdir} was trained with {old!r}, "
                                                f"this config has {new!r}: its checkpoints cannot "
                                                "be restored (use another --workdir)")
    _check_padded_vocab(workdir, saved_model, config.model)
    saved_decay = saved.get("train", {}).get("ema_decay", 0.0)
    new_decay = config.train.get("ema_decay", 0.0)
    if (float(saved_decay) > 0) != (float(new_decay) > 0):
        raise ConfigError("train.ema_decay", f"the run in {workdir} has ema_decay={saved_decay}, "
                                             f"this config {new_decay}: the checkpoints do "
                                             "(or do not) hold an EMA of the params")


def _padded_rows(model: dict) -> int:
    """Embedding / LM head rows of a model section: padded_vocab_size resolved (0 = the
    rounding of tfusion/config.py); a section without the field is from before padding
    existed, whose tables had exactly vocab_size rows."""
    if "padded_vocab_size" not in model:
        return int(model["vocab_size"])
    return int(model["padded_vocab_size"]) or padded_vocab(int(model["vocab_size"]))


def _check_padded_vocab(workdir: str, saved_model: dict, model) -> None:
    """Refuses (naming model.padded_vocab_size) a restart whose embedding / LM head rows
    differ from the checkpoints'. Checkpoints saved before the vocabulary was padded
    are not padded on restore: resume them with padded_vocab_size = their vocab_size."""
    if "vocab_size" not in saved_model:
        return
    old = _padded_rows(saved_model)
    new = _padded_rows(model.to_dict() if hasattr(model, "to_dict") else dict(model))
    if old == new:
        return
    before = ("" if "padded_vocab_size" in saved_model else
              " (saved before the vocabulary was padded to a multiple of 128)")
    raise ConfigError("model.padded_vocab_size",
                      f"the run in {workdir} has {old} embedding / LM head rows{before}, this "
                      f"config {new}: its checkpoints cannot be restored; resume with "
                      f"--config.model.padded_vocab_size={old} or use another --workdir")


def _plain(value):
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
