"""A tool deletes only what it can prove it wrote: a file goes while its content is what its writer recorded.

    from lib.ownership import mark_owned, remove_owned
    mark_owned("models/checkpoints", "train.py", "--checkpoint_dir")  # refuses another tool's folder
    remove_owned("models/checkpoints", "train.py")                    # its recorded files only; a photo of yours stays

Two records, one rule:
- a folder a tool owns whole carries its marker (`OWNER_MARKER`, the tool's name). The marker says whose folder it is
  (`owner_of`, `owned_by`; `mark_owned`, `check_replaceable` and `check_not_foreign` refuse a folder marked by another
  tool) but is never a licence to delete: what the tool wrote there is recorded in the folder's `CLAIMS` file;
- every file written through lib.files.atomic_path (save_json, save_npy, save_csv, save_figure, checkpoints) inside a
  marked folder is recorded there at write time by `record_written` (relative path, size, sha256); a folder built
  whole (`building`) records its listing when it is finished (`claim_tree`); a file filled in place (a factor-cache
  memmap) is recorded as allocated (its size) by `claim_allocated` and its sha256 is sealed when the tool is done
  (`seal_claims`);
- files and links a tool writes into a folder it shares with the user (results/, false_predictions/) are claimed in
  that folder's `CLAIMS` file the same way (`claim_files`; a link with its target).

`remove_recorded` is the one removal: a file goes only while it matches its record (a link: the same target; an
allocated file: the same size; else the same size and sha256); a folder goes only when nothing else is left in it.
Files of the user, files changed since, and anything unrecorded stay and are returned (`remove_owned` and
`remove_inside_owned` say them in a warning).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

from lib.cli import UserError
from lib.files import file_sha256, is_relative_to, save_json, usual_mode

log = logging.getLogger(__name__)

OWNER_MARKER = ".written_by"
CLAIMS = ".written_files.json"
BOOKKEEPING = (OWNER_MARKER, CLAIMS)


def owner_of(folder: str | os.PathLike) -> str | None:
    """The tool named by `folder`'s marker, or None for an unmarked folder."""
    marker = Path(folder) / OWNER_MARKER
    try:
        return marker.read_text().strip() if marker.is_file() else None
    except OSError:
        return None


def owned_by(folder: str | os.PathLike, tool: str) -> bool:
    return owner_of(folder) == tool


def check_not_foreign(folder: str | os.PathLike, tool: str | None, flag: str) -> None:
    """Refuse, with one line, an output `folder` that another tool marked as its own (a prepared data set, a checkpoint
    folder, a cache). tool=None: a writer into a shared folder, which no tool's marked folder may be."""
    other = owner_of(folder)
    if other is not None and other != tool:
        raise UserError(f"{flag} {folder} is {other}'s folder (its {OWNER_MARKER} says so); {tool or 'this tool'} does not "
                        f"write there: pass another {flag}")
    if tool is not None:  # a folder a tool takes whole: not one where other tools recorded files (a results folder)
        others = recorded_by_others(folder, tool)
        if others:
            raise UserError(f"{flag} {folder} holds files {', '.join(others)} wrote (its {CLAIMS} says so), which {tool} did "
                            f"not write: pass another {flag}")


def recorded_by_others(folder: str | os.PathLike, tool: str) -> list[str]:
    """The tools other than `tool` that recorded files in `folder` (its CLAIMS)."""
    return sorted({str(e.get("tool")) for e in read_claims(Path(folder)).values()
                   if isinstance(e, dict) and e.get("tool") not in (None, "", tool)})


def mark_owned(folder: str | os.PathLike, tool: str, flag: str = "the output folder") -> None:
    """Mark `folder` as written by `tool`; a folder marked by another tool is refused (check_not_foreign)."""
    check_not_foreign(folder, tool, flag)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / OWNER_MARKER).write_text(tool + "\n")


def remove_owned(folder: str | os.PathLike, tool: str) -> bool:
    """Remove what `tool` recorded writing in its marked `folder` (remove_recorded), and the folder once nothing else
    is left; files it cannot prove are its own stay, said. Returns whether the folder is gone."""
    folder = Path(folder)
    if not folder.exists():
        return False
    if not owned_by(folder, tool):
        raise UserError(f"{folder} was not written by {tool} (no {OWNER_MARKER} marker); "
                        "it is left untouched: move it away yourself or pick another folder")
    say_kept(folder, tool, remove_recorded(folder)[1])
    return not folder.exists()


def remove_inside_owned(path: str | os.PathLike, owner_root: str | os.PathLike, tool: str) -> list[Path]:
    """Remove `path` (a file or folder) inside `owner_root`, a folder `tool` marked as its own, as far as its records
    prove it was written there (remove_recorded). Returns the files kept (said in a warning)."""
    path, owner_root = Path(path), Path(owner_root)
    if not owned_by(owner_root, tool) or path.is_symlink() or not is_relative_to(path, owner_root) or \
            path.resolve() == owner_root.resolve():
        raise UserError(f"{path} is not inside a folder {tool} marked as its own; it is left untouched")
    kept = remove_recorded(path)[1]
    say_kept(path, tool, kept)
    return kept


def say_kept(where: Path, tool: str, kept: list[Path]) -> None:
    if kept:
        names = ", ".join(str(p) for p in kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        log.warning(f"warning: kept {len(kept)} file(s) in {where} that {tool} did not write or that changed since it "
                    f"wrote them: {names}")


# ---------------------------------------------------------------- records
@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder's record (flock on the folder itself: no lock file is left behind)."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record_holder(start: Path) -> Path | None:
    """The nearest marked folder at or above `start`: the one whose record lists what is written under it."""
    start = Path(start).absolute()
    for folder in (start, *start.parents):
        if (folder / OWNER_MARKER).is_file():
            return folder
    return None


def _entry(path: Path, tool: str, allocated: bool = False) -> dict:
    if path.is_symlink():
        return {"tool": tool, "link": os.readlink(path)}
    size = path.stat().st_size
    return {"tool": tool, "size": size, "sha256": None, "allocated": True} if allocated else \
        {"tool": tool, "size": size, "sha256": file_sha256(path)}


def claim_files(folder: str | os.PathLike, names: list[str], tool: str, allocated: bool = False) -> None:
    """Record that `tool` wrote these entries of `folder` (names relative to it): a file with its size and sha256
    (allocated=True: a file still being filled in place, with its size only), a symlink with its target."""
    folder = Path(folder)
    with _locked(folder):
        claims = read_claims(folder)
        for name in names:
            claims[name] = _entry(folder / name, tool, allocated)
        save_json(folder / CLAIMS, claims)


def record_written(path: str | os.PathLike) -> None:
    """Record a file just written (lib.files.atomic_path calls this) in the nearest marked folder above it, as written
    by that folder's tool; a file outside any marked folder is recorded by its writer (claim_files) or not at all."""
    path = Path(path).absolute()
    holder = None if path.name in BOOKKEEPING else record_holder(path.parent)
    if holder is not None:
        claim_files(holder, [path.relative_to(holder).as_posix()], owner_of(holder))


def claim_allocated(paths: list[Path]) -> None:
    """Record files a tool allocated and fills in place (memmaps) in their marked folder, by size until seal_claims."""
    for path in paths:
        holder = record_holder(Path(path).parent)
        if holder is not None:
            claim_files(holder, [Path(path).absolute().relative_to(holder).as_posix()], owner_of(holder), allocated=True)


def seal_claims(folder: str | os.PathLike) -> None:
    """The tool is done filling its allocated files in `folder`: record their sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    with _locked(folder):
        claims = read_claims(folder)
        for name, entry in claims.items():
            if isinstance(entry, dict) and entry.get("allocated") and (folder / name).is_file():
                claims[name] = _entry(folder / name, entry.get("tool", ""))
        save_json(folder / CLAIMS, claims)


def claim_tree(folder: str | os.PathLike, tool: str) -> None:
    """Record every file and link under `folder` as `tool`'s (a folder it has just built, before anyone else can write
    there); subfolders with a marker of their own keep their own records."""
    folder = Path(folder)
    names = []
    for d, subdirs, files in os.walk(folder):
        d = Path(d)
        links = [s for s in subdirs if (d / s).is_symlink()]
        subdirs[:] = [s for s in subdirs if s not in links and not (d / s / OWNER_MARKER).is_file()]
        names += [(d / f).relative_to(folder).as_posix() for f in files + links if not (d == folder and f in BOOKKEEPING)]
    claim_files(folder, sorted(names), tool)


def matches(path: Path, entry) -> bool:
    """Whether `path` is exactly what its record entry says was written (a link: the same target; an allocated file:
    the same size; a file: the same size and sha256)."""
    if not isinstance(entry, dict):
        return False
    if path.is_symlink() or "link" in entry:
        return path.is_symlink() and os.readlink(path) == entry.get("link")
    if not path.is_file():
        return False
    size = path.stat().st_size
    if entry.get("size") is not None and size != entry["size"]:
        return False
    if entry.get("sha256") is None:
        return bool(entry.get("allocated")) and entry.get("size") is not None
    return file_sha256(path) == entry["sha256"]


def claimed(folder: str | os.PathLike, name: str) -> bool:
    """Whether `folder/name` is exactly what a tool claimed there (the same bytes, or a link to the same target)."""
    return matches(Path(folder) / name, read_claims(Path(folder)).get(name))


def read_claims(folder: Path) -> dict:
    try:
        claims = json.loads((Path(folder) / CLAIMS).read_text())
        return claims if isinstance(claims, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_claims(folder: Path, claims: dict) -> None:
    if claims:
        save_json(folder / CLAIMS, claims)
    else:
        (folder / CLAIMS).unlink(missing_ok=True)


def remove_recorded(path: str | os.PathLike, dry_run: bool = False) -> tuple[int, list[Path]]:
    """The one removal. A file goes while it matches the record of the marked folder above it; a folder: every file
    under it that its records (its own, the marked folder above it, and those of marked folders inside it) list and
    that matches, then each folder left empty (a marked one once its record is empty). Returns (how many files went,
    the files kept: unrecorded, changed, or links of yours). dry_run: remove nothing, only say what would be kept."""
    path = Path(path).absolute()
    if not (path.exists() or path.is_symlink()):
        return 0, []
    is_dir = path.is_dir() and not path.is_symlink()
    holders = [h for h in [record_holder(path if is_dir else path.parent)] if h is not None]
    if is_dir:
        for d, subdirs, _ in os.walk(path):
            subdirs[:] = [s for s in subdirs if not (Path(d) / s).is_symlink()]
            holders += [Path(d) / s for s in subdirs if (Path(d) / s / OWNER_MARKER).is_file()]
    n, gone = 0, set()
    for holder in dict.fromkeys(holders):
        with _locked(holder):
            claims = read_claims(holder)
            for name, entry in list(claims.items()):
                target = holder / name
                if not (target == path or path in target.parents) or ".." in Path(name).parts:
                    continue
                if not (target.exists() or target.is_symlink()):
                    claims.pop(name)
                elif matches(target, entry):
                    gone.add(target)
                    if not dry_run:
                        target.unlink()
                        claims.pop(name)
                        n += 1
            if not dry_run:
                _save_claims(holder, claims)
    if not is_dir:
        return n, [] if path in gone else [path]
    kept = []
    for d, subdirs, files in os.walk(path, topdown=False):
        d = Path(d)
        kept += [d / f for f in files + [s for s in subdirs if (d / s).is_symlink()]
                 if f not in BOOKKEEPING and d / f not in gone]
        if dry_run:
            continue
        left = set(os.listdir(d))
        if not left - {OWNER_MARKER} or (left == {OWNER_MARKER, CLAIMS} and not read_claims(d)):
            for f in left:
                (d / f).unlink()
            d.rmdir()
    return n, kept


def check_replaceable(target: str | os.PathLike, tool: str, flag: str) -> Path:
    """Refuse, before any work, a `target` folder that `tool` may not replace: a symlink, a file, a folder another tool
    marked, or a non-empty folder without `tool`'s marker. Returns the path."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{flag} {target} is a {'symlink' if target.is_symlink() else 'file'}; pass a plain folder path")
    if target.is_dir():
        check_not_foreign(target, tool, flag)
        if any(p.name != OWNER_MARKER for p in target.iterdir()) and not owned_by(target, tool):
            raise UserError(f"{flag} {target} holds files that {tool} did not write (no {OWNER_MARKER} marker); "
                            "they are left untouched: pass another folder")
    return target


@contextlib.contextmanager
def building(target: str | os.PathLike, tool: str, flag: str) -> Iterator[Path]:
    """Yield an empty folder beside `target`; on success its listing is recorded (claim_tree), it replaces `target`
    whole (marked as `tool`'s), and the old folder is removed through its record: files `tool` cannot prove it wrote
    (yours, or changed since) are moved to `<target>.kept-<id>` beside it, said. On failure `target` stays as it was."""
    import shutil

    target = check_replaceable(target, tool, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    try:
        os.chmod(build, usual_mode(folder=True))
        yield build
        claim_tree(build, tool)
        mark_owned(build, tool, flag)
        check_replaceable(target, tool, flag)  # again: it may have changed while we worked
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(build, target)
        if old is not None:
            kept = remove_recorded(old / "x")[1]
            if kept:  # yours, or changed since: kept beside the new folder, said
                aside = target.with_name(f"{target.name}.kept-{Path(old).name.rsplit('-', 1)[-1]}")
                os.replace(old / "x", aside)
                say_kept(aside, tool, [aside / p.relative_to(old / "x") for p in kept])
            old.rmdir()
    finally:
        if build.exists():
            shutil.rmtree(build)


def remove_claimed(folder: str | os.PathLike, names: list[str]) -> list[str]:
    """Remove those of `names` that a tool claimed in `folder` (a shared folder) and that are unchanged since; returns
    the ones removed. A file that changed, a link re-pointed, or anything else under a claimed name is left where it is."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / CLAIMS).is_file():
        return []
    with _locked(folder):
        claims, removed = read_claims(folder), []
        for name in names:
            if name not in claims:
                continue
            if claimed(folder, name):
                (folder / name).unlink()
                removed.append(name)
            claims.pop(name, None)
        if removed:
            _save_claims(folder, claims)
    return removed
