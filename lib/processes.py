"""Child processes of a tool (the train.py runs of retraining experiments and ensembles) end with it.

    p = child_process([sys.executable, "-m", "train", ...])   # SIGTERM when this process dies, even by SIGKILL
    rc = run_child([...])                                     # waited for; ended first if this process unwinds
"""
from __future__ import annotations

import sys


def quiet_worker(*_args) -> None:
    """Initializer for worker processes: default SIGTERM, ignore Ctrl-C (the parent handles both)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent dies
    except (OSError, AttributeError):  # not Linux: the parent's own cleanup (below) still ends it on SIGTERM/Ctrl-C
        pass


def child_process(argv: list[str], **popen_kw):
    """A child tool process (a retraining train.py) that ends with its parent: on Linux it gets SIGTERM when the parent
    dies (even by SIGKILL), and `end_children` ends it when the parent unwinds."""
    import subprocess

    p = subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None, **popen_kw)
    _CHILDREN.append(p)
    return p


def end_children(procs=None) -> None:
    """SIGTERM, then SIGKILL after 10 s, every child process still running (all of child_process's by default)."""
    import subprocess

    procs = list(_CHILDREN if procs is None else procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_child(argv: list[str], **popen_kw) -> int:
    """child_process, waited for; interrupted (SIGTERM, Ctrl-C, an exception), the child is ended first."""
    p = child_process(argv, **popen_kw)
    try:
        return p.wait()
    finally:
        end_children([p])
        _CHILDREN.remove(p)


_CHILDREN: list = []
