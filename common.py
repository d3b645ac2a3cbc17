"""Small shared helpers: the user-error convention, seeding, atomic writes, run metadata.

Every script's `main(argv)` raises `UserError` for bad input; `cli()` turns it into one
line on stderr and exit code 2, so a user never sees a traceback for a mistake of theirs.

    from common import UserError, cli
    if __name__ == "__main__":
        cli(main)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


_MAIN_PID: int | None = None


def _sigterm(signum, frame):
    # SLURM sends SIGTERM at the time limit: unwind like Ctrl-C so finally-blocks save progress.
    # Only the process that installed the handler unwinds; a forked worker (multiprocessing
    # pool, DataLoader) that inherited it just exits quietly, as it would without the handler.
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt("SIGTERM")


def quiet_worker(*_args) -> None:
    """Initializer for worker processes: default SIGTERM, ignore Ctrl-C (the parent handles both)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def user_message(e: BaseException) -> str:
    """One line for a UserError, also when a DataLoader worker raised it.

    torch re-raises a worker's exception as the same type with the message "Caught UserError in
    DataLoader worker process N. Original Traceback ... common.UserError: <message>"; the user
    needs only <message>.
    """
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(e).__name__


def os_error_message(e: OSError) -> str:
    """One line for an OSError: what failed, where, and for a full disk how much is free."""
    import errno
    import shutil

    where = e.filename or ""
    if e.errno == errno.ENOSPC or "No space left" in str(e) or "file write failed" in str(e):
        folder = Path(where).parent if where else Path.cwd()
        try:
            free = shutil.disk_usage(folder if folder.exists() else Path.cwd()).free
            free_text = f"{free / 2**20:.1f} MiB free"
        except OSError:
            free_text = "free space unknown"
        return f"no space left on device writing {where or 'output'} ({free_text}); free space in {folder} and rerun (finished work is kept)"
    return f"{e.strerror or e}: {where}" if where else (e.strerror or str(e))


def cli(main: Callable[[list[str] | None], int | None]) -> None:
    """Run a script's main(): a UserError or an OSError becomes one stderr line and exit 2."""
    import signal

    global _MAIN_PID
    _MAIN_PID = os.getpid()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        code = main(None)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"error: {os_error_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def scheduled_lr(epoch: int, schedule: str, peak: float, epochs: int) -> float:
    """train.py's learning rate during 1-based `epoch`: constant, or cosine from `peak` over `epochs`."""
    import math

    if schedule == "constant":
        return peak
    return 0.5 * peak * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def set_seed(seed: int) -> None:
    """The one seeding helper: Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- argparse types
def _ranged(kind, lo=None, hi=None, lo_open=False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be {'>' if lo_open else '>='} {lo})")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be <= {hi})")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _ranged(int, lo=1)
nonneg_int = _ranged(int, lo=0)
positive_float = _ranged(float, lo=0.0, lo_open=True)


def fraction(lo: float = 0.0, hi: float = 1.0, lo_open: bool = False):
    return _ranged(float, lo=lo, hi=hi, lo_open=lo_open)


# ---------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame atomically, without its index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_figure(path: str | os.PathLike, fig) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)


# ---------------------------------------------------------------- folders: checked early, cleared only when ours
OWNER_MARKER = ".written_by"


def ensure_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create `path` if needed and check that files can be written there, before any work.

    Raises UserError naming the flag for a path that is a file, is not writable, or cannot exist.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written to ({e.strerror or e}); pass another folder") from None
    return path


def mark_owned(folder: str | os.PathLike, tool: str) -> None:
    """Mark `folder` as written by `tool`, so that only `tool` ever clears it."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / OWNER_MARKER).write_text(tool + "\n")


def owned_by(folder: str | os.PathLike, tool: str) -> bool:
    marker = Path(folder) / OWNER_MARKER
    return marker.is_file() and marker.read_text().strip() == tool


def remove_owned(folder: str | os.PathLike, tool: str) -> bool:
    """Delete `folder` only if `tool` marked it as its own; returns whether it was deleted."""
    import shutil

    folder = Path(folder)
    if not folder.exists():
        return False
    if not owned_by(folder, tool):
        raise UserError(f"{folder} was not written by {tool} (no {OWNER_MARKER} marker); "
                        "it is left untouched: move it away yourself or pick another folder")
    shutil.rmtree(folder)
    return True


def is_relative_to(a: Path, b: Path) -> bool:
    """Whether resolved path a equals or lies inside resolved path b."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents


# ---------------------------------------------------------------- devices
def resolve_device(name: str = "auto"):
    """auto, cpu, cuda or cuda:N -> torch.device; anything else is a UserError naming --device."""
    import re

    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if not m or (m.group(1) == "cpu" and m.group(2)):
        raise UserError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if m.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but CUDA is not available here")
        if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- run metadata
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
