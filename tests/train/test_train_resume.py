"""Exact resume through the real CLI and data pipeline: a run killed with SIGKILL, or
stopped with SIGTERM (preemption), then restarted in the same workdir, produces the
same per-step losses and the same final parameters and EMA as an uninterrupted run.
The runs read a mixture (data.mixture): procedural shapes, webdataset shards and a
streaming text corpus, so the block-read sources' state resumes exactly too."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers.train_fixtures import TINY_CLI_OVERRIDES, read_losses
from tfusion import sharding
from tfusion.train import optimizer, state as state_lib
from tfusion.train.checkpoint import Checkpointer
from tests.helpers import REPO_ROOT

STEPS = 40
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
pytestmark = pytest.mark.slow


_MIXTURE: list[str] = []  # the data flags, set by the module's `mixture` fixture


@pytest.fixture(scope="module", autouse=True)
def mixture(tmp_path_factory):
    from tests.helpers import web_shards

    root = tmp_path_factory.mktemp("mixture_data")
    (root / "wds").mkdir()
    (root / "text").mkdir()
    web_shards.write_webdataset(root / "wds")
    web_shards.write_text_shards(root / "text")
    entries = [{"name": "shapes", "source": "shapes", "weight": 0.4},
               {"name": "web", "source": "webdataset", "data_dir": f"{root}/wds/*.tar",
                "weight": 0.3, "eval_examples": 2, "shuffle_block": 4},
               {"name": "corpus", "source": "text", "data_dir": f"{root}/text/*",
                "weight": 0.3, "eval_examples": 2, "shuffle_block": 4}]
    _MIXTURE[:] = [f"--config.data.mixture={json.dumps(entries)}"]
    yield
    _MIXTURE.clear()


def _command(workdir):
    return [sys.executable, "-m", "launch.train", "--config=experiments/registry.py:shapes_tiny",
            f"--workdir={workdir}", *TINY_CLI_OVERRIDES, f"--config.train.steps={STEPS}",
            "--config.train.log_every=1", "--config.train.checkpoint_every=3", *_MIXTURE]


def _run(workdir):
    proc = subprocess.run(_command(workdir), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _interrupt(workdir, sig, after_steps: int):
    """Starts a run and sends `sig` once `after_steps` steps are logged."""
    proc = subprocess.Popen(_command(workdir), cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= after_steps:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _final_params(workdir):
    """Params and their EMA of the final checkpoint, restored onto one device."""
    config = _config()
    assert state_lib.uses_ema(config)  # the EMA is part of what must resume exactly
    tx = optimizer.make_optimizer(config.optimizer)
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    shardings = state_lib.train_state_shardings(config.model, tx, mesh, sharding.rule_table(),
                                          ema=True)
    target = state_lib.abstract_state(config.model, tx, shardings)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2)
    assert ckpt.latest_step() == STEPS
    state, _ = ckpt.restore(STEPS, target)
    ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves((state["params"], state["ema_params"]))]


def _config():
    """The CLI's config: shapes_tiny with TINY_CLI_OVERRIDES applied."""
    from experiments.registry import get_config

    c = get_config("shapes_tiny")
    for flag in TINY_CLI_OVERRIDES:
        key, value = flag[len("--config."):].split("=")
        section, field = key.split(".")
        c[section][field] = type(c[section][field])(value)
    return c


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    _run(workdir)
    return read_losses(workdir), _final_params(workdir)


def _assert_same_run(workdir, reference):
    ref_losses, ref_params = reference
    losses = read_losses(workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert last["data_web_records_read"] > 0 and last["data_corpus_records_read"] > 0
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [losses[s] for s in sorted(losses)] == [ref_losses[s] for s in sorted(losses)]
    for a, b in zip(_final_params(workdir), ref_params):
        np.testing.assert_array_equal(a, b)


def test_sigkill_then_restart_resumes_exactly(reference, tmp_path):
    rc, err = _interrupt(str(tmp_path), signal.SIGKILL, after_steps=8)
    assert rc == -signal.SIGKILL, f"the run ended before the kill (rc={rc}):\n{err[-2000:]}"
    _run(str(tmp_path))
    _assert_same_run(str(tmp_path), reference)


def test_sigterm_saves_a_checkpoint_that_resumes(reference, tmp_path):
    rc, err = _interrupt(str(tmp_path), signal.SIGTERM, after_steps=7)
    assert rc == 0, err[-3000:]
    assert "SIGTERM received" in err
    ckpt = Checkpointer(os.path.join(tmp_path, "checkpoints"), keep=2)
    stopped_at = ckpt.latest_step()
    ckpt.close()
    assert 7 <= stopped_at < STEPS  # saved at the step boundary after the signal
    _run(str(tmp_path))
    _assert_same_run(str(tmp_path), reference)
