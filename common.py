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


def _sigterm(signum, frame):
    # SLURM sends SIGTERM at the time limit: unwind like Ctrl-C so finally-blocks save progress.
    raise KeyboardInterrupt("SIGTERM")


def cli(main: Callable[[list[str] | None], int | None]) -> None:
    """Run a script's main(), mapping UserError to one stderr line and exit 2."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        code = main(None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


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


# ---------------------------------------------------------------- run metadata
def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def check_run_args(out_dir: Path, args: dict, overwrite: bool, name: str = "run_args.json") -> None:
    """Refuse to reuse `out_dir` when its saved arguments differ, unless overwrite."""
    saved = out_dir / name
    if saved.exists() and not overwrite:
        old = json.loads(saved.read_text())
        old = {k: v for k, v in old.items() if k in args}
        if old != json.loads(json.dumps(args, default=str)):
            diff = sorted(k for k in args if old.get(k) != json.loads(json.dumps(args[k], default=str)))
            raise UserError(
                f"{out_dir} holds results of a run with other arguments ({', '.join(diff)}); "
                "pass --overwrite or choose another output directory"
            )
