"""Small shared helpers: the user-error convention, seeding, atomic writes, run metadata.

Every script's `main(argv)` raises `UserError` for bad input; `cli()` turns it into one
line on stderr and exit code 2, so a user never sees a traceback for a mistake of theirs.

    from common import UserError, cli
    if __name__ == "__main__":
        cli(main)

Why one module over 300 lines: it is a toolbox of small, independent helpers (one-line errors, flag types, seeding,
atomic writes, ownership markers, identity checks), each a few lines, grouped by section; nothing in it is a stage.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
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


# ---------------------------------------------------------------- atomic writes
def usual_mode(folder: bool = False) -> int:
    """The permissions open() or mkdir() would give under this process's umask (mkstemp and mkdtemp give 0600 and
    0700, which would hide results from the colleagues a umask lets read them)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only on success (with the usual permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, usual_mode())
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


def remove_dangling_link(link: str | os.PathLike, target: str) -> bool:
    """Delete `link` only if it is a symlink to exactly `target` (the link a tool made) that no longer resolves."""
    link = Path(link)
    if link.is_symlink() and os.readlink(link) == target and not link.exists():
        link.unlink()
        return True
    return False


def remove_inside_owned(path: str | os.PathLike, owner_root: str | os.PathLike, tool: str) -> None:
    """Delete `path` (a file or folder) that lies inside `owner_root`, only if `tool` marked `owner_root` as its own."""
    import shutil

    path, owner_root = Path(path), Path(owner_root)
    if not owned_by(owner_root, tool) or path.is_symlink() or not is_relative_to(path, owner_root) or \
            path.resolve() == owner_root.resolve():
        raise UserError(f"{path} is not inside a folder {tool} marked as its own; it is left untouched")
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


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


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes: the identity of a checkpoint or an input file."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- reading result files: one line per bad file
def read_json(path: str | os.PathLike, fix: str = "rerun the tool that wrote it") -> dict:
    """A JSON object from `path`; a missing, unreadable or corrupt file is one UserError naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({first_line(e)}); {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"cannot read {path} (not a JSON object); {fix}")
    return value


def first_line(e: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message (an empty file's IndexError, say)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_npy(path: str | os.PathLike, mmap_mode: str | None = "r", fix: str = "rerun the tool that wrote it") -> np.ndarray:
    """np.load with a truncated or corrupt file turned into one UserError naming it."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read {path} ({first_line(e)}); {fix}") from None


def load_npz(path: str | os.PathLike, keys=(), fix: str = "rerun the tool that wrote it") -> dict:
    """Every array of an .npz, read now; a truncated, corrupt or incomplete file (a missing key) is one UserError."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"cannot read {path} ({first_line(e)}); {fix}") from None
    missing = [k for k in keys if k not in out]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {fix}")
    return out


def read_table(path: str | os.PathLike, columns: dict[str, str], fix: str):
    """A CSV with the given columns ({name: 'int' | 'float' | 'str'}): a missing column, an empty file or a
    cell of the wrong type is one UserError naming the file and the column."""
    import pandas as pd

    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as e:  # EmptyDataError and ParserError are ValueErrors
        raise UserError(f"cannot read {path} as CSV ({first_line(e)}); {fix}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; {fix}")
    for name, kind in columns.items():
        if kind == "str":
            table[name] = table[name].astype(str)
            continue
        values = pd.to_numeric(table[name], errors="coerce")
        # a float column may have empty cells (NaN), never text; an int column neither
        bad = (values.isna() | (values % 1 != 0)) if kind == "int" else (values.isna() & table[name].notna())
        if bad.any():
            raise UserError(f"{path}: column {name} has {table[name][bad].iloc[0]!r} (row {int(np.flatnonzero(bad)[0]) + 2}), "
                            f"not a{'n integer' if kind == 'int' else ' number'}; {fix}")
        table[name] = values.astype(np.int64 if kind == "int" else np.float64)
    return table


# ---------------------------------------------------------------- identities of inputs
def identity_mismatch(recorded: dict | None, current: dict) -> str | None:
    """The first key where a recorded input identity differs from the current one, as 'key: then X, now Y'; None if equal."""
    recorded = recorded or {}
    for key, now in current.items():
        then = recorded.get(key)
        if json.loads(json.dumps(then, default=str)) != json.loads(json.dumps(now, default=str)):
            short = lambda v: (str(v)[:16] + "...") if len(str(v)) > 19 else str(v)
            return f"{key}: then {short(then)}, now {short(now)}"
    return None


# ---------------------------------------------------------------- files in a shared folder: claimed, removed only if unchanged
CLAIMS = ".written_files.json"


def claim_files(folder: str | os.PathLike, names: list[str], tool: str) -> None:
    """Record that `tool` wrote these files of `folder` (with their sha256), so that a later run may remove them,
    and only while they are byte-identical to what was written (a user's own file of the same name is never touched)."""
    folder = Path(folder)
    claims = read_claims(folder)
    for name in names:
        claims[name] = {"tool": tool, "sha256": file_sha256(folder / name)}
    save_json(folder / CLAIMS, claims)


def read_claims(folder: Path) -> dict:
    try:
        claims = json.loads((folder / CLAIMS).read_text())
        return claims if isinstance(claims, dict) else {}
    except (OSError, ValueError):
        return {}


def remove_claimed(folder: str | os.PathLike, names: list[str]) -> list[str]:
    """Remove those of `names` that a tool claimed in `folder` and that are unchanged since; returns the ones removed.
    A file that changed, a symlink or a folder under a claimed name is left where it is."""
    folder = Path(folder)
    claims, removed = read_claims(folder), []
    for name in names:
        path = folder / name
        entry = claims.get(name)
        if entry is None or path.is_symlink() or not path.is_file():
            continue
        if file_sha256(path) == entry.get("sha256"):
            path.unlink()
            removed.append(name)
        claims.pop(name, None)
    if removed and claims:
        save_json(folder / CLAIMS, claims)
    elif removed:
        (folder / CLAIMS).unlink(missing_ok=True)
    return removed


def remove_run_files(folder: str | os.PathLike, record: str) -> list[str]:
    """Remove a results folder's run: the plain files its record (a JSON with a "files" list, written last by the
    one results writer) names, then the record. Nothing the record does not name is touched."""
    folder = Path(folder)
    path = folder / record
    if not path.is_file() or path.is_symlink():
        return []
    try:
        files = json.loads(path.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        files = []
    removed = []
    for name in [n for n in files if isinstance(n, str) and Path(n).name == n and not n.startswith(".")] + [record]:
        if (folder / name).is_file() and not (folder / name).is_symlink():
            (folder / name).unlink()
            removed.append(name)
    return removed


# ---------------------------------------------------------------- folders: built beside, swapped in whole
def check_replaceable(target: str | os.PathLike, tool: str, flag: str) -> Path:
    """Refuse, before any work, a `target` folder that `tool` may not replace: a symlink, a file, or a non-empty
    folder without `tool`'s marker. Returns the path."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{flag} {target} is a {'symlink' if target.is_symlink() else 'file'}; pass a plain folder path")
    if target.is_dir() and any(p.name != OWNER_MARKER for p in target.iterdir()) and not owned_by(target, tool):
        raise UserError(f"{flag} {target} holds files that {tool} did not write (no {OWNER_MARKER} marker); "
                        "they are left untouched: pass another folder")
    return target


@contextlib.contextmanager
def building(target: str | os.PathLike, tool: str, flag: str) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success it replaces `target` whole (marked as `tool`'s), and the old
    folder is deleted, checked again for `tool`'s marker at that moment. On failure `target` is left as it was."""
    import shutil

    target = check_replaceable(target, tool, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    try:
        os.chmod(build, usual_mode(folder=True))
        yield build
        mark_owned(build, tool)
        check_replaceable(target, tool, flag)  # again: it may have changed while we worked
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(build, target)
        if old is not None:
            if owned_by(old / "x", tool) or not any(p.name != OWNER_MARKER for p in (old / "x").iterdir()):
                shutil.rmtree(old)
    finally:
        if build.exists():
            shutil.rmtree(build)
