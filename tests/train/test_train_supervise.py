"""The supervised trainer process (launch/supervise.py): a child that dies of a signal
ends the run with one line naming the signal and the newest checkpoint; exit codes and
SIGTERM pass through; the child never outlives its supervisor."""
import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.helpers import REPO_ROOT
from launch import supervise


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _fake_workdir(tmp_path, steps, unfinished=()):
    for step in steps:
        os.makedirs(tmp_path / "checkpoints" / str(step))
    for step in unfinished:
        os.makedirs(tmp_path / "checkpoints" / f"{step}.orbax-checkpoint-tmp-1733")
    return str(tmp_path)


def test_abort_names_the_newest_finished_checkpoint(tmp_path, caplog):
    workdir = _fake_workdir(tmp_path, [100, 200], unfinished=[300])
    with caplog.at_level("ERROR", logger="tfusion"):
        rc = supervise.supervise(_python("import os; os.abort()"), workdir)
    assert rc == 128 + signal.SIGABRT
    (line,) = [r.getMessage() for r in caplog.records]
    assert "SIGABRT" in line and "collective" in line
    assert f"newest checkpoint: step 200 in {workdir}/checkpoints" in line
    assert "rerun the same command" in line


def test_no_checkpoint_said_so(tmp_path, caplog):
    with caplog.at_level("ERROR", logger="tfusion"):
        rc = supervise.supervise(_python("import os; os.kill(os.getpid(), 11)"), str(tmp_path))
    assert rc == 128 + signal.SIGSEGV
    assert f"no checkpoint in {tmp_path}/checkpoints" in caplog.records[0].getMessage()


def test_exit_codes_pass_through(tmp_path, caplog):
    with caplog.at_level("ERROR", logger="tfusion"):
        assert supervise.supervise(_python("import sys; sys.exit(3)"), str(tmp_path)) == 3
        assert supervise.supervise(_python("pass"), str(tmp_path)) == 0
    assert not caplog.records  # a normal exit adds no line of ours


def test_workdir_flag_spellings():
    assert supervise.workdir_from_argv(["--config=x", "--workdir=/a/b"]) == "/a/b"
    assert supervise.workdir_from_argv(["--workdir", "/c", "--config.train.steps=3"]) == "/c"
    assert supervise.workdir_from_argv(["--config=x"]) is None


def _wait_for(path, timeout_s=60):
    deadline = time.time() + timeout_s
    while not os.path.exists(path) or not open(path).read().strip():
        assert time.time() < deadline, f"{path} never written"
        time.sleep(0.05)
    return open(path).read().strip()


def _supervisor(tmp_path, child_code: str) -> subprocess.Popen:
    """A supervisor process (as launch.train runs one) around `child_code`."""
    child = _python(child_code)
    code = f"""
        import sys
        from launch import supervise
        sys.exit(supervise.supervise({child!r}, {str(tmp_path)!r}))
    """
    return subprocess.Popen(_python(code), cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)


def test_sigterm_reaches_the_child(tmp_path):
    marker = tmp_path / "child_pid"
    parent = _supervisor(tmp_path, f"""
        import os, signal, sys, time
        def stop(signum, frame):
            sys.exit(143)  # as the trainer does after its preemption checkpoint
        signal.signal(signal.SIGTERM, stop)
        open({str(marker)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    _wait_for(marker)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 143


def test_child_dies_with_a_killed_supervisor(tmp_path):
    marker = tmp_path / "child_pid"
    parent = _supervisor(tmp_path, f"""
        import os, time
        from launch import supervise
        supervise.exit_with_parent()
        open({str(marker)!r}, "w").write(str(os.getpid()))
        time.sleep(60)
    """)
    child_pid = int(_wait_for(marker))
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        # A dead child stays a zombie until reaped by init: read its state.
        with open(f"/proc/{child_pid}/stat") as f:
            if f.read().split(") ")[1].startswith("Z"):
                return
        time.sleep(0.1)
    os.kill(child_pid, signal.SIGKILL)
    raise AssertionError("the trainer child outlived its killed supervisor")
