"""A tool deletes only what it marked as its own.

One rule, two records of it:
- a folder a tool owns whole carries its marker (`OWNER_MARKER`, the tool's name): `mark_owned`, `owned_by`,
  `remove_owned`, `remove_inside_owned`; `check_replaceable` and `building` (a folder built beside its target and
  swapped in whole) refuse a folder that is not the tool's;
- files and links a tool writes into a folder it shares with the user (results/, false_predictions/) are claimed in
  that folder's `CLAIMS` file with their content (a file's sha256, a link's target): `claim_files`, `remove_claimed`
  removes a claimed entry only while it is exactly what was written; a user's file or link of the same name stays.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from lib.cli import UserError
from lib.files import file_sha256, is_relative_to, save_json, usual_mode


OWNER_MARKER = ".written_by"


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


def remove_inside_owned(path: str | os.PathLike, owner_root: str | os.PathLike, tool: str) -> None:
    """Delete `path` (a file or folder) that lies inside `owner_root`, only if `tool` marked `owner_root` as its own."""
    import shutil

    path, owner_root = Path(path), Path(owner_root)
    if not owned_by(owner_root, tool) or path.is_symlink() or not is_relative_to(path, owner_root) or \
            path.resolve() == owner_root.resolve():
        raise UserError(f"{path} is not inside a folder {tool} marked as its own; it is left untouched")
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


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


CLAIMS = ".written_files.json"


def claim_files(folder: str | os.PathLike, names: list[str], tool: str) -> None:
    """Record that `tool` wrote these entries of `folder`, a file with its sha256 and a symlink with its target, so
    that a later run may remove them, and only while they are exactly what was written (a user's own file or link of
    the same name is never touched)."""
    folder = Path(folder)
    claims = read_claims(folder)
    for name in names:
        path = folder / name
        claims[name] = {"tool": tool, **({"link": os.readlink(path)} if path.is_symlink() else {"sha256": file_sha256(path)})}
    save_json(folder / CLAIMS, claims)


def claimed(folder: str | os.PathLike, name: str) -> bool:
    """Whether `folder/name` is exactly what a tool claimed there (the same bytes, or a link to the same target)."""
    path, entry = Path(folder) / name, read_claims(Path(folder)).get(name)
    if not isinstance(entry, dict):
        return False
    if "link" in entry:
        return path.is_symlink() and os.readlink(path) == entry["link"]
    return path.is_file() and not path.is_symlink() and file_sha256(path) == entry.get("sha256")


def read_claims(folder: Path) -> dict:
    try:
        claims = json.loads((folder / CLAIMS).read_text())
        return claims if isinstance(claims, dict) else {}
    except (OSError, ValueError):
        return {}


def remove_claimed(folder: str | os.PathLike, names: list[str]) -> list[str]:
    """Remove those of `names` that a tool claimed in `folder` and that are unchanged since; returns the ones removed.
    A file that changed, a link re-pointed, or anything else under a claimed name is left where it is."""
    folder = Path(folder)
    claims, removed = read_claims(folder), []
    for name in names:
        if name not in claims:
            continue
        if claimed(folder, name):
            (folder / name).unlink()
            removed.append(name)
        claims.pop(name, None)
    if removed and claims:
        save_json(folder / CLAIMS, claims)
    elif removed:
        (folder / CLAIMS).unlink(missing_ok=True)
    return removed
