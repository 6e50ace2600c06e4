"""The trainer runs in a child process, so that a fatal abort still ends with our message.

XLA ends a process with SIGABRT when a collective times out (`rendezvous.cc: Termination
timeout ... Expected 8 threads to join the rendezvous, but only 7 of them arrived`: one
device's participant was starved, e.g. by an overloaded machine) and on its other fatal
errors. No Python code runs in the dying process, so the run itself cannot say what
the user should do next. `launch.train` therefore starts the trainer as a child and
waits: exit codes pass through unchanged, SIGTERM and SIGHUP are forwarded (the
child checkpoints and stops as documented), and a child killed by a signal ends the
run with one error line naming the signal and the newest checkpoint to resume from.

The parent imports no JAX and holds no device. The child dies with its parent
(`exit_with_parent`), so killing the parent (SIGKILL included) never leaves an
orphaned trainer writing into the workdir. TFUSION_SUPERVISE=0 runs the trainer in
the same process (debuggers, profilers that follow one pid).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

CHILD_ENV = "TFUSION_TRAIN_PARENT_PID"  # set in the child: its supervisor's pid
_log = logging.getLogger("tfusion")

_WHY = {
    signal.SIGABRT: "XLA aborts the process when a collective times out (a device's "
                    "participant was starved: an overloaded machine or another thread's "
                    "JAX work) and on its other fatal errors; its own message is above",
    signal.SIGSEGV: "a crash in native code (XLA, a data-loading library)",
    signal.SIGKILL: "killed from outside, often by the kernel's out-of-memory killer "
                    "(see `dmesg`)",
}


def supervised() -> bool:
    """True when this process should supervise a child trainer."""
    return not os.environ.get(CHILD_ENV) and os.environ.get("TFUSION_SUPERVISE", "1") != "0"


def workdir_from_argv(argv: Sequence[str]) -> str | None:
    """The --workdir flag's value (absl spells it --workdir=X or --workdir X)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
        if arg == "--workdir" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def newest_checkpoint(workdir: str | None) -> str:
    """'newest checkpoint: step N in DIR' from the directory names alone (orbax names
    finished steps by their number; unfinished ones carry a temporary suffix)."""
    if workdir is None:
        return "no --workdir given"
    directory = os.path.join(workdir, "checkpoints")
    try:
        steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    except OSError:
        steps = []
    if not steps:
        return f"no checkpoint in {directory}"
    return f"newest checkpoint: step {max(steps)} in {directory}"


def supervise(command: Sequence[str], workdir: str | None) -> int:
    """Runs `command` as the child trainer; returns the exit code for this process."""
    env = dict(os.environ, **{CHILD_ENV: str(os.getpid())})
    child = subprocess.Popen(list(command), env=env)

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C reaches the whole process group, the child included: it handles it.
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if rc >= 0:
        return rc
    sig = signal.Signals(-rc)
    why = _WHY.get(sig, "ended by a signal")
    _log.error("the training process died of %s (%s); %s; rerun the same command to "
               "resume from it", sig.name, why, newest_checkpoint(workdir))
    return 128 + sig.value


def exit_with_parent() -> None:
    """In the child: die when the supervisor dies, however it died."""
    parent = int(os.environ.get(CHILD_ENV, "0"))
    if not parent:
        return
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(128 + signal.SIGKILL)
            return

    def watch():  # elsewhere: poll (pure Python, no JAX work on this thread)
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(128 + signal.SIGKILL)

    threading.Thread(target=watch, name="tfusion-parent-watch", daemon=True).start()
