"""A tool deletes only what it can prove it wrote: two verbs, one record.

    from lib.ownership import Owner
    OWNER = Owner("train.py")                                  # once per module: the name in its folders' markers

    # 1. a folder the tool owns whole: refused now when it is not this owner's (a symlink, a file, another tool's
    #    folder, a non-empty folder without this owner's marker), then either built beside and swapped in on success
    out = OWNER.folder("TracIn/results/report", "--out_dir")
    with out as build:
        save_json(build / "index.json", ...)                   # on success `build` replaces the folder whole
    #    or filled in place (a checkpoint folder, a factor cache: resumable), and removed only through its record
    ckpt = OWNER.folder("models/checkpoints", "--checkpoint_dir").fill()
    ckpt.remove(ckpt.path / "last.pth")                        # re-checks the marker; the file goes while unchanged

    # 2. files written into a folder shared with the user (results/, false_predictions/): claimed there
    OWNER.claim("false_predictions", ["false_predictions.csv"])
    remove_claimed("false_predictions", ["false_predictions.csv"])  # only while the content is what was claimed

Two records, one rule:
- a folder a tool owns whole carries its marker (`OWNER_MARKER`, the tool's name). The marker says whose folder it is
  (`owner_of`) and lets only that owner replace or fill it, but is never a licence to delete: what the tool wrote there
  is recorded in the folder's `CLAIMS` file;
- every file written through lib.files.atomic_path (save_json, save_npy, save_csv, save_figure, checkpoints) inside a
  marked folder is recorded there at write time by `record_written` (relative path, size, sha256); a folder built
  whole records its listing when it is finished; a file filled in place (a factor-cache memmap) is claimed as
  allocated (its size) and its sha256 is sealed when the tool is done (`OwnedFolder.seal`);
- files and links a tool writes into a folder it shares with the user are claimed in that folder's `CLAIMS` file the
  same way (`Owner.claim`; a link with its target).

`_remove_recorded` is the one removal: a file goes only while it matches its record (a link: the same target; an
allocated file: the same size; else the same size and sha256); a folder goes only when nothing else is left in it.
Files of the user, files changed since, and anything unrecorded stay and are said in a warning.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lib.cli import UserError
from lib.files import file_sha256, is_relative_to, save_json, usual_mode

log = logging.getLogger(__name__)

OWNER_MARKER = ".written_by"
CLAIMS = ".written_files.json"
BOOKKEEPING = (OWNER_MARKER, CLAIMS)


class Owner:
    """A tool that writes files, named once in its module; its two verbs are `folder` and `claim`."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"Owner({self.name!r})"

    def folder(self, target: str | os.PathLike, flag: str = "the output folder") -> "OwnedFolder":
        """Verb 1: `target` as a folder this owner replaces whole or fills in place; refused now (one line naming
        `flag`) when it is a symlink, a file, another tool's folder, or a non-empty folder without this owner's marker."""
        folder = OwnedFolder(target, self.name, flag)
        folder.check()
        return folder

    def claim(self, folder: str | os.PathLike, names: list[str], allocated: bool = False) -> None:
        """Verb 2: record in `folder`'s CLAIMS that this owner wrote these entries of it (names relative to it): a file
        with its size and sha256 (allocated=True: a file still being filled in place, with its size only), a symlink
        with its target. `remove_claimed` later removes only what is still exactly as claimed."""
        _claim(Path(folder), list(names), self.name, allocated)


class OwnedFolder:
    """A folder one owner replaces whole (`with folder as build:`) or fills in place (`fill`); writers get it from
    Owner.folder (checked), a cleaner names a folder by its marker (`OwnedFolder(path, owner_of(path)).remove()`)."""

    def __init__(self, target: str | os.PathLike, owner: str, flag: str = "the output folder"):
        self.path, self.owner, self.flag = Path(target), owner, flag

    def check(self) -> None:
        """Refuse a target this owner may not replace (see Owner.folder)."""
        target = self.path
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise UserError(f"{self.flag} {target} is a {'symlink' if target.is_symlink() else 'file'}; pass a plain folder path")
        if target.is_dir():
            check_not_foreign(target, self.owner, self.flag)
            if any(p.name != OWNER_MARKER for p in target.iterdir()) and owner_of(target) != self.owner:
                raise UserError(f"{self.flag} {target} holds files that {self.owner} did not write (no {OWNER_MARKER} "
                                "marker); they are left untouched: pass another folder")

    def __enter__(self) -> Path:
        """An empty folder beside the target; on a clean exit its listing is recorded, it replaces the target whole
        (marked as the owner's), and the old folder is removed through its record: files the owner cannot prove it
        wrote (yours, or changed since) are moved to `<target>.kept-<id>` beside it, said. On failure the target stays."""
        self.check()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._build = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.build-", dir=self.path.parent))
        os.chmod(self._build, usual_mode(folder=True))
        return self._build

    def __exit__(self, exc_type, exc, tb) -> None:
        build, target = self._build, self.path
        try:
            if exc_type is not None:
                return
            _claim_tree(build, self.owner)
            _mark(build, self.owner)
            self.check()  # again: the target may have changed while we worked
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "x")
            os.replace(build, target)
            if old is not None:
                kept = _remove_recorded(old / "x")[1]
                if kept:  # yours, or changed since: kept beside the new folder, said
                    aside = target.with_name(f"{target.name}.kept-{Path(old).name.rsplit('-', 1)[-1]}")
                    os.replace(old / "x", aside)
                    _say_kept(aside, self.owner, [aside / p.relative_to(old / "x") for p in kept])
                old.rmdir()
        finally:
            if build.exists():
                shutil.rmtree(build)

    def discard(self, part: str | os.PathLike) -> None:
        """Remove `part`, a file or folder inside the folder this `with` block is building (the owner made that folder
        a moment ago, so all in it is its own); anything else is refused, untouched."""
        build, part = getattr(self, "_build", None), Path(part)
        if build is None or not build.is_dir() or part.is_symlink() or not is_relative_to(part, build) or \
                part.resolve() == build.resolve():
            raise UserError(f"{part} is not inside the folder {self.owner} is building; it is left untouched")
        if part.is_dir():
            shutil.rmtree(part)
        elif part.exists():
            part.unlink()

    def fill(self, start_over: bool = False) -> "OwnedFolder":
        """Make and mark the folder to be written in place (resumable writers); start_over: first remove what the owner
        recorded writing there (its files of before; anything else stays, said)."""
        self.check()
        if start_over:
            self.remove()
        _mark(self.path, self.owner)
        return self

    def remove(self, part: str | os.PathLike | None = None) -> bool:
        """Remove `part` (a file or folder inside; default: the whole folder) as far as the folder's records prove the
        owner wrote it, re-checking that the folder is still the owner's; what stays is said in a warning. Returns
        whether `part` is gone."""
        folder = self.path
        where = folder if part is None else Path(part)
        if not (where.exists() or where.is_symlink()):
            return True
        if owner_of(folder) != self.owner:
            raise UserError(f"{folder} was not written by {self.owner} (no {OWNER_MARKER} marker); "
                            "it is left untouched: move it away yourself or pick another folder")
        if part is not None and (where.is_symlink() or not is_relative_to(where, folder) or
                                 where.resolve() == folder.resolve()):
            raise UserError(f"{where} is not inside a folder {self.owner} marked as its own; it is left untouched")
        _say_kept(where, self.owner, _remove_recorded(where)[1])
        return not (where.exists() or where.is_symlink())

    def seal(self) -> None:
        """The owner is done filling its allocated files here: record their sha256."""
        folder = self.path
        if not folder.is_dir():
            return
        with _locked(folder):
            claims = read_claims(folder)
            for name, entry in claims.items():
                if isinstance(entry, dict) and entry.get("allocated") and (folder / name).is_file():
                    claims[name] = _entry(folder / name, entry.get("tool", ""))
            save_json(folder / CLAIMS, claims)


def owner_of(folder: str | os.PathLike) -> str | None:
    """The tool named by `folder`'s marker, or None for an unmarked folder."""
    marker = Path(folder) / OWNER_MARKER
    try:
        return marker.read_text().strip() if marker.is_file() else None
    except OSError:
        return None


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


def _mark(folder: Path, tool: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / OWNER_MARKER).write_text(tool + "\n")


def _say_kept(where: Path, tool: str, kept: list[Path]) -> None:
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


def _record_holder(start: Path) -> Path | None:
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


def _claim(folder: str | os.PathLike, names: list[str], tool: str, allocated: bool = False) -> None:
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
    by that folder's tool; a file outside any marked folder is claimed by its writer (Owner.claim) or not at all."""
    path = Path(path).absolute()
    holder = None if path.name in BOOKKEEPING else _record_holder(path.parent)
    if holder is not None:
        _claim(holder, [path.relative_to(holder).as_posix()], owner_of(holder))


def _claim_tree(folder: str | os.PathLike, tool: str) -> None:
    """Record every file and link under `folder` as `tool`'s (a folder it has just built, before anyone else can write
    there); subfolders with a marker of their own keep their own records."""
    folder = Path(folder)
    names = []
    for d, subdirs, files in os.walk(folder):
        d = Path(d)
        links = [s for s in subdirs if (d / s).is_symlink()]
        subdirs[:] = [s for s in subdirs if s not in links and not (d / s / OWNER_MARKER).is_file()]
        names += [(d / f).relative_to(folder).as_posix() for f in files + links if not (d == folder and f in BOOKKEEPING)]
    _claim(folder, sorted(names), tool)


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


def _remove_recorded(path: str | os.PathLike) -> tuple[int, list[Path]]:
    """The one removal. A file goes while it matches the record of the marked folder above it; a folder: every file
    under it that its records (its own, the marked folder above it, and those of marked folders inside it) list and
    that matches, then each folder left empty (a marked one once its record is empty). Returns (how many files went,
    the files kept: unrecorded, changed, or links of yours)."""
    path = Path(path).absolute()
    if not (path.exists() or path.is_symlink()):
        return 0, []
    is_dir = path.is_dir() and not path.is_symlink()
    holders = [h for h in [_record_holder(path if is_dir else path.parent)] if h is not None]
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
                    target.unlink()
                    claims.pop(name)
                    n += 1
            _save_claims(holder, claims)
    if not is_dir:
        return n, [] if path in gone else [path]
    kept = []
    for d, subdirs, files in os.walk(path, topdown=False):
        d = Path(d)
        kept += [d / f for f in files + [s for s in subdirs if (d / s).is_symlink()]
                 if f not in BOOKKEEPING and d / f not in gone]
        left = set(os.listdir(d))
        # only bookkeeping left, claiming nothing that is still there (a claim of a file removed through a record above)
        if left <= {OWNER_MARKER, CLAIMS} and not any((d / n).exists() or (d / n).is_symlink() for n in read_claims(d)):
            for f in left:
                (d / f).unlink()
            d.rmdir()
    return n, kept


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
