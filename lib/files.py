"""Files: written atomically, read with one error line per bad file, identified by their content.

- writes: `atomic_path` (a temporary name renamed into place on success) under `save_npy`, `save_json`, `save_csv`,
  `save_figure` and the checkpoints; a file it puts inside a tool's marked folder is recorded there with its sha256
  (lib.ownership.record_written), so that only a file still exactly as written is ever removed; `ensure_output_dir`
  checks a folder can be written, and is not another tool's, before any work;
- reads: `read_json`, `load_npy`, `load_npz`, `read_table` turn a missing, truncated or malformed file into a UserError
  naming it and the fix; `npy_damage` says why an .npy's size is not what its header implies;
- identities: `file_sha256` (a checkpoint's or input's identity is its bytes), `identity_mismatch` (what changed
  between a recorded and a current identity), `git_commit`.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from lib.cli import UserError, first_line

REPO_ROOT = Path(__file__).resolve().parent.parent


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
        from lib.ownership import record_written  # lib.ownership builds on this module

        record_written(path)
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


def ensure_output_dir(path: str | os.PathLike, flag: str, tool: str | None = None) -> Path:
    """Create `path` if needed and check that files can be written there, before any work.

    Raises UserError naming the flag for a path that is a file, is not writable, cannot exist, or is a folder another
    tool marked as its own (tool: the writer's own marker name; None for a writer into a shared folder, which no
    tool's marked folder may be).
    """
    from lib.ownership import check_not_foreign  # lib.ownership builds on this module

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; pass a folder path")
    check_not_foreign(path, tool, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written to ({e.strerror or e}); pass another folder") from None
    return path


def is_relative_to(a: Path, b: Path) -> bool:
    """Whether resolved path a equals or lies inside resolved path b."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents


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


def read_json(path: str | os.PathLike, fix: str = "rerun the tool that wrote it") -> dict:
    """A JSON object from `path`; a missing, unreadable or corrupt file is one UserError naming it."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({first_line(e)}); {fix}") from None
    if not isinstance(value, dict):
        raise UserError(f"cannot read {path} (not a JSON object); {fix}")
    return value


def npy_damage(path: str | os.PathLike) -> str | None:
    """Why an .npy file cannot be what its header says (an unreadable header, or a size other than the header's shape
    and dtype imply: cut short or grown); None when it can. Reads the header only."""
    from numpy.lib import format as npy

    try:
        with open(path, "rb") as f:
            version = npy.read_magic(f)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read_header(f)
            want = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, EOFError) as e:
        return f"cannot read {path} ({first_line(e)})"
    if size != want:
        return f"{path} has {size:,} bytes, not the {want:,} its header implies (cut short or overwritten)"
    return None


def load_npy(path: str | os.PathLike, mmap_mode: str | None = "r", fix: str = "rerun the tool that wrote it") -> np.ndarray:
    """np.load with a truncated or corrupt file turned into one UserError naming it. A memory-mapped file must have
    exactly the size its header implies (np.load's "r+" would silently zero-extend a file cut short)."""
    damage = npy_damage(path) if mmap_mode is not None else None
    if damage:
        raise UserError(f"{damage}; {fix}")
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
    cell of the wrong type is one UserError naming the file and the column; so is a file cut short (every table
    written here ends with a line break; one that does not lost its last rows, and would read as a shorter table)."""
    import pandas as pd

    try:
        table = pd.read_csv(path)
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) not in b"\r\n":
                raise ValueError("it ends mid-row: the file was cut short")
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


def identity_mismatch(recorded: dict | None, current: dict) -> str | None:
    """The first key where a recorded input identity differs from the current one, as 'key: then X, now Y'; None if equal."""
    recorded = recorded or {}
    for key, now in current.items():
        then = recorded.get(key)
        if json.loads(json.dumps(then, default=str)) != json.loads(json.dumps(now, default=str)):
            short = lambda v: (str(v)[:16] + "...") if len(str(v)) > 19 else str(v)
            return f"{key}: then {short(then)}, now {short(now)}"
    return None
