"""The command-line convention every tool follows: bad input is one line and exit code 2, never a traceback.

Every script's `main(argv)` raises `UserError` for bad input; `cli()` turns it (and an OSError such as a full disk)
into one line on stderr and exit code 2, and SIGTERM (SLURM's time limit) into an unwinding like Ctrl-C.

    from lib.cli import UserError, cli
    if __name__ == "__main__":
        cli(main)

The argparse types (`positive_int`, `image_side`, `fraction`, ...) refuse a flag out of range the same way.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable


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


def user_message(e: BaseException) -> str:
    """One line for a UserError, also when a DataLoader worker raised it.

    torch re-raises a worker's exception as the same type with the message "Caught UserError in
    DataLoader worker process N. Original Traceback ... lib.cli.UserError: <message>"; the user
    needs only <message>.
    """
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text else type(e).__name__


def first_line(e: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message (an empty file's IndexError, say)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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


def int_text(text: str) -> int:
    """A string of ASCII digits (optional sign) as an int; ValueError otherwise. int() alone also takes "1_0", " 3" and
    other scripts' digits, while str.isdigit() also trusts "²", which int() refuses."""
    import re

    if not isinstance(text, str) or not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(f"not an integer: {text!r}")
    return int(text)


def checked_int(value, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer argument of a public function (an int, a numpy integer or a string int_text reads; not a bool, a float
    or NaN), in lo..hi; else UserError naming `what`. The notebook API checks every integer argument with it."""
    import numbers

    if isinstance(value, str):
        try:
            value = int_text(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{what} must be an integer, not {str(value)[:40]!r} ({type(value).__name__})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"{lo}..{hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None else f"<= {hi}")
        raise UserError(f"{what}={value} is out of range ({span})")
    return value


def _ranged(kind, lo=None, hi=None, lo_open=False):
    def parse(text: str):
        try:
            value = (int_text if kind is int else kind)(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be {'>' if lo_open else '>='} {lo})")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range (must be <= {hi})")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _ranged(int, lo=1)


nonneg_int = _ranged(int, lo=0)


at_least_two = _ranged(int, lo=2)


positive_float = _ranged(float, lo=0.0, lo_open=True)


# an image side in pixels: 4096 px x 4096 px x 3 floats is 200 MB per image already; beyond it a batch exhausts memory
image_side = _ranged(int, lo=8, hi=4096)


nonneg_float = _ranged(float, lo=0.0)


def plain_name(text: str) -> str:
    """argparse type of a name used inside a file name: letters, digits, '.', '_', '-' only, so it never leaves its folder."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a plain name (letters, digits, '.', '_', '-'; no '/' or leading '.')")
    return text


def fraction(lo: float = 0.0, hi: float = 1.0, lo_open: bool = False):
    return _ranged(float, lo=lo, hi=hi, lo_open=lo_open)


def skip(why: str, notes: list[str] | None) -> None:
    """A reader's answer for a missing or stale output: refuse with one line (notes=None), or note it (returns None).
    An output that is there, current and unreadable is refused whatever `notes` (a corrupt file is not a state to skip)."""
    if notes is None:
        raise UserError(why)
    notes.append(why)

