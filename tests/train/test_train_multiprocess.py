"""Two processes on 127.0.0.1 (2 CPU devices each, gloo collectives) train exactly
like one process with 4 devices."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.helpers.train_fixtures import read_losses, synthetic_config, synthetic_iterator_fn
from tfusion.train.loop import Trainer
from tests.helpers import REPO_ROOT



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "tests", "helpers", "train_fixtures.py"),
                               str(multi), str(i), "2", str(port)], env=env, cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    # Meanwhile, the reference: one process, 4 of this process's devices.
    config = synthetic_config(steps=4)
    Trainer(config, str(single), devices=jax.devices()[:4],
            train_iterator_fn=synthetic_iterator_fn()).run()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
        assert f"RESULT {i} 4 done" in out
    got, want = read_losses(str(multi)), read_losses(str(single))
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
