"""Checkpoint and workdir faults, injected: each is survived (exactly: the resumed run
matches an uninterrupted one) or refused with an error naming what is wrong.

The trained reference (4 steps, checkpoints at 2 and 4) is made once per module and
copied into each test's tmp_path, so a test can break its copy freely.
"""
import glob
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from tests.helpers.train_fixtures import (SyntheticIterator, read_losses, synthetic_config,
                                  synthetic_iterator_fn)
from tfusion.config import ConfigError
from tfusion.train import state as state_lib
from tfusion.train.checkpoint import CheckpointSaveError, Checkpointer
from tfusion.train.feed import BatchFeed
from tfusion.train.loop import Trainer
from tfusion.train.workdir import LOCK_FILE, WorkdirLock, WorkdirLockedError
from tests.helpers import REPO_ROOT



def _run(workdir, steps, iterator_fn=None, **train_fields):
    config = synthetic_config(steps=steps)
    config.train.update(train_fields)
    trainer = Trainer(config, str(workdir),
                      train_iterator_fn=iterator_fn or synthetic_iterator_fn())
    result = trainer.run()
    return trainer, result


def _params(state) -> list:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state["params"]))]


def _restored_params(workdir, step) -> list:
    config = synthetic_config()
    trainer = Trainer(config, str(workdir), train_iterator_fn=synthetic_iterator_fn())
    target = state_lib.abstract_state(config.model, trainer.tx, trainer.state_sh)
    state, _ = trainer.checkpointer.restore(step, target)
    trainer.checkpointer.close()
    return _params(state)


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 4-step run (checkpoints 2, 4) and an uninterrupted 6-step run's final params."""
    four = tmp_path_factory.mktemp("four")
    _run(four, 4)
    six = tmp_path_factory.mktemp("six")
    trainer, _ = _run(six, 6)
    return {"four": four, "six_params": _params(trainer.state), "six": six}


def _copy(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference["four"], workdir)
    return workdir


def _largest_array_file(workdir, step):
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                      recursive=True)
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", pytest.param("delete", marks=pytest.mark.slow)])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, damage,
                                                                     caplog):
    workdir = _copy(reference, tmp_path)
    victim = _largest_array_file(workdir, 4)
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    else:
        os.remove(victim)
    with caplog.at_level(logging.WARNING, logger="tfusion"):
        trainer, result = _run(workdir, 6)
    assert "checkpoint step 4 unreadable: resumed from step 2" in caplog.text
    assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", "4"))
    # Steps 3..6 retrained from step 2 equal the uninterrupted run, and step 4 was
    # saved afresh instead of being skipped as already present.
    assert result.step == 6
    _assert_same(_params(trainer.state), reference["six_params"])
    assert 4 in Checkpointer(os.path.join(workdir, "checkpoints"), 3).all_steps()


def test_no_readable_checkpoint_is_refused_and_nothing_is_moved(reference, tmp_path):
    from tfusion.train.checkpoint import NoRestorableCheckpointError

    workdir = _copy(reference, tmp_path)
    for step in (2, 4):
        os.remove(_largest_array_file(workdir, step))
    with pytest.raises(NoRestorableCheckpointError, match=r"steps \[4, 2\]"):
        _run(workdir, 6)
    assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))


def test_disk_full_while_saving_stops_the_run_and_keeps_the_previous_checkpoint(reference,
                                                                                tmp_path):
    workdir = _copy(reference, tmp_path)
    before = _restored_params(workdir, 4)
    # RLIMIT_FSIZE makes every write past 100 kB fail with EFBIG, as a full disk fails
    # with ENOSPC: orbax's array files are larger, metrics rows are not.
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limit[1]))
    try:
        with pytest.raises(CheckpointSaveError) as error:
            _run(workdir, 6)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(error.value)
    assert "step 6" in message and "Newest complete checkpoint: step 4 (intact)" in message
    assert "File too large" in message
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), 3)
    assert checkpointer.latest_step() == 4
    checkpointer.close()
    _assert_same(_restored_params(workdir, 4), before)


def test_restart_with_another_model_shape_is_refused_before_restore(reference, tmp_path,
                                                                   monkeypatch):
    workdir = _copy(reference, tmp_path)
    saved = (workdir / "config.json").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("restored or compiled before the config check")

    monkeypatch.setattr(Checkpointer, "restore_latest", must_not_run)
    config = synthetic_config(steps=6)
    config.model.width = 96
    with pytest.raises(ConfigError) as error:
        Trainer(config, str(workdir), train_iterator_fn=synthetic_iterator_fn()).run()
    assert error.value.field == "model.width"
    assert "64" in str(error.value) and "96" in str(error.value)
    assert (workdir / "config.json").read_text() == saved  # not overwritten


def test_second_trainer_on_a_workdir_is_refused(tmp_path):
    first = WorkdirLock(str(tmp_path)).acquire()
    try:
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()} on host"):
            _run(tmp_path, 2)
        assert not os.path.exists(tmp_path / "checkpoints" / "2")
    finally:
        first.release()
    WorkdirLock(str(tmp_path)).acquire().release()  # free again once released


def test_lock_of_a_killed_trainer_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from tfusion.train.workdir import WorkdirLock; lock = WorkdirLock(sys.argv[2]).acquire();"
         "print('locked', flush=True); time.sleep(600)", REPO_ROOT, str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid}"):
        WorkdirLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="tfusion"):
        lock = WorkdirLock(str(tmp_path)).acquire()
    lock.release()
    assert f"pid {holder.pid}" in caplog.text and "taking over" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text() or "{}") == {}


class _StallingIterator(SyntheticIterator):
    """Delivers `stall_at` batches, then blocks in next() as a stuck pipeline would."""

    def __init__(self, config, *, stall_at, stalled, release, **kw):
        super().__init__(config, **kw)
        self.stall_at, self.stalled, self.release = stall_at, stalled, release

    def __next__(self):
        if self.step >= self.stall_at:
            self.stalled.set()
            self.release.wait(120)  # never released in time: a stuck pipeline
        return super().__next__()


def _logged_steps(workdir) -> set:
    try:
        return set(read_losses(str(workdir)))
    except (OSError, ValueError):
        return set()


@pytest.mark.slow
def test_sigterm_while_the_pipeline_stalls_saves_and_resumes_exactly(reference, tmp_path):
    stalled, release = threading.Event(), threading.Event()

    def make(config, *, process_index, process_count):
        return _StallingIterator(config, stall_at=3, stalled=stalled, release=release,
                                 process_index=process_index, process_count=process_count)

    def terminate_when_stalled():
        # Once step 3 is logged, the loop's next wait is for the stalled 4th batch.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and 3 not in _logged_steps(tmp_path):
            time.sleep(0.05)
        if stalled.wait(120):
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_when_stalled, daemon=True)
    killer.start()
    try:
        _, result = _run(tmp_path, 6, iterator_fn=make, checkpoint_every=100)
    finally:
        release.set()
    killer.join()
    assert (result.step, result.stopped) == (3, "preempted")
    # The checkpoint holds the data position after batch 3, so the restarted run sees
    # batches 4..6 and ends where the uninterrupted run ends.
    trainer, result = _run(tmp_path, 6)
    assert result.step == 6
    _assert_same(_params(trainer.state), reference["six_params"])
    six, resumed = read_losses(str(reference["six"])), read_losses(str(tmp_path))
    assert resumed == six


def test_feed_checkpoint_position_is_the_last_batch_handed_out_not_the_last_read():
    config = synthetic_config()
    iterator = SyntheticIterator(config)
    feed = BatchFeed(iterator, ahead=2)
    first = feed.next()
    deadline = time.monotonic() + 30
    while iterator.step < 3 and time.monotonic() < deadline:  # the thread reads ahead
        time.sleep(0.01)
    assert iterator.step >= 3
    assert feed.state == {"step": 1}
    second = feed.next()
    assert feed.state == {"step": 2}
    assert feed.close()
    reference = SyntheticIterator(config)
    for got in (first, second):
        want = next(reference)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_feed_reraises_the_pipeline_error_in_the_loop():
    class Broken:
        def __next__(self):
            raise ValueError("no usable record")

        def get_state(self):
            return {}

    feed = BatchFeed(Broken())
    with pytest.raises(ValueError, match="no usable record"):
        feed.next()
    feed.close()


_DEADLINE_SCRIPT = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import logging
logging.basicConfig(level=logging.INFO)
from tests.helpers.train_fixtures import synthetic_config, synthetic_iterator_fn
from tfusion.train.loop import train

def stalled_eval(config, *, process_index, process_count):
    def batches():
        print("EVAL STALLED", flush=True)
        time.sleep(3600)
        yield None
    return batches()

config = synthetic_config(steps=6, eval_every=3, preemption_timeout_s=3.0)
train(config, sys.argv[2], train_iterator_fn=synthetic_iterator_fn(),
      eval_iterator_fn=stalled_eval)
"""


@pytest.mark.slow
def test_sigterm_deadline_ends_a_run_stuck_away_from_a_step_boundary(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _DEADLINE_SCRIPT, REPO_ROOT, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ""
    while "EVAL STALLED" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "the held-out evaluation at step 3" in stderr
    assert "newest checkpoint: step 2" in stderr


def test_loading_an_unreadable_checkpoint_names_it_and_the_other_steps(reference, tmp_path):
    from tfusion.eval.checkpoints import UnreadableCheckpointError, load_model

    workdir = _copy(reference, tmp_path)
    # Every array file of step 4: load_model reads the params only, so damage to a file
    # that holds only optimizer state (the largest one may) would rightly go unnoticed.
    for path in glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "**", "d", "*"),
                          recursive=True):
        os.remove(path)
    with pytest.raises(UnreadableCheckpointError, match=r"checkpoint step 4 .* other steps: 2"):
        load_model(str(workdir))
    model, _, step = load_model(str(workdir), step=2)
    assert step == 2
