"""The run folder: one TracIn run at its root (results.py writes it), and one subfolder per tool that works from it.
Which folder and file hold what is told once, in README.md's "Where outputs land".

    TracIn/results/              efficient_tracin.py: run.json, top_k_*.npy, self_influence.npy, ...
        factors/                 efficient_tracin.py's factor cache
        <tool's folder>/         any tool's output, with inputs.json: {"tool": ..., "tracin_run": ..., its other inputs}

A tool builds its subfolder beside its place and swaps it in whole (`tool_folder`, through lib.ownership.Owner.folder), marked as its own and carrying
`inputs.json`; a tool that fills its folder arm by arm (resumable) marks it and calls `record_inputs`. Core lists no
tool: a derived folder is any subfolder whose inputs.json names a tool that marked it and a TracIn run. A tool may
declare notebook links (`tool_folder(..., links=[...])`): root paths pointing at files of its folder, claimed by it
(lib.ownership). A new TracIn run removes every derived folder and every file or link another tool claimed at the
root (only while unchanged: a file or folder of yours stays), so nothing derived from the previous run survives it.

Every tool's reader (`<tool>.load(run)`) checks staleness here, in one way: `current` for a folder, `stale` for a
record carrying its own "tracin_run"; `skip` refuses with one line (notes=None) or notes the line and returns None.

    from TracIn.core.run_folder import current
    mislabel = current("TracIn/results", "mislabel", run_id(record), notes)   # the folder, or None with a note
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Iterator

from lib.cli import skip
from lib.files import save_json
from lib.ownership import OwnedFolder, Owner, claimed, owner_of, read_claims, remove_claimed

INPUTS = "inputs.json"


@contextlib.contextmanager
def tool_folder(out: Path, tool: str, inputs: dict, flag: str = "--out_dir", links=()) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `out` whole, with inputs.json ({"tool", **inputs}; inputs
    holds "tracin_run"), and the root's notebook links to its files `links` are refreshed. On failure `out` stays as
    it was."""
    out = Path(out)
    with Owner(tool).folder(out, flag) as build:
        yield build
        save_json(build / INPUTS, {"tool": tool, "folder": out.name, **inputs})
    link_notebook_paths(out, tool, links)


def record_inputs(folder: Path, tool: str, inputs: dict) -> None:
    """inputs.json of a folder `tool` marked and fills in place (resumable arms): what makes it a derived folder."""
    save_json(Path(folder) / INPUTS, {"tool": tool, "folder": Path(folder).name, **inputs})


def link_notebook_paths(out: Path, tool: str, links) -> list[str]:
    """Where `out` is a run folder's tool subfolder, point the root's paths `links` (file names in `out`) at its files.
    A link is made or replaced only where the name is free or holds the link a tool claimed there (lib.ownership); a
    file or a link of yours of that name (dangling or pointing elsewhere) stays, said."""
    root, made = out.parent, []
    for name in links:
        if not (out / name).is_file() or not (root / "run.json").exists():
            continue
        link = root / name
        ours = claimed(root, name)
        if (link.exists() or link.is_symlink()) and not ours:
            what = f"a link of yours (to {os.readlink(link)})" if link.is_symlink() else "a file that is not a link"
            logging.getLogger(__name__).warning(f"warning: {link} is {what}; left as it is, the table is {out / name}")
            continue
        tmp = root / f".{name}.{uuid.uuid4().hex[:12]}.link"  # a fresh name: nothing to delete first
        os.symlink(f"{out.name}/{name}", tmp)
        os.replace(tmp, link)
        Owner(tool).claim(root, [name])
        made.append(name)
    return made


def read_inputs(folder: Path) -> dict | None:
    try:
        value = json.loads((Path(folder) / INPUTS).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def derived_tool(folder: Path) -> str | None:
    """The tool whose derived folder `folder` is: its inputs.json names the tool, a TracIn run and this folder's name (a
    copy of yours under another name, marker and record included, is not the tool's), and the tool marked it."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    inputs = read_inputs(folder)
    tool = inputs.get("tool") if inputs else None
    if not (isinstance(tool, str) and "tracin_run" in inputs and inputs.get("folder") == folder.name):
        return None
    return tool if owner_of(folder) == tool else None


def derived_folders(root: Path) -> dict[Path, str]:
    """The run folder's derived subfolders: folder -> the tool that wrote it."""
    root = Path(root)
    found = {p: derived_tool(p) for p in sorted(root.iterdir()) if not p.name.startswith(".")} if root.is_dir() else {}  # not a build
    return {p: t for p, t in found.items() if t is not None}


def stale(value: dict | None, run: str, where: Path) -> str | None:
    """Why a tool's record `value` (inputs.json, or a result carrying "tracin_run") is not of the TracIn run `run`
    (results.run_id); None when it is. The one staleness check of every reader."""
    if not isinstance(value, dict):
        return f"{where} skipped: no readable record of what it was computed from; rerun the tool that wrote it"
    if value.get("tracin_run") != run:
        return (f"{where} skipped: it was computed from another TracIn run ({value.get('tracin_run') or 'unknown'}, this one "
                f"is {run}); rerun the tool that wrote it")
    return None


def current(root: Path, name: str, run: str, notes: list[str] | None = None, tool: str | None = None) -> Path | None:
    """root/name when a tool (`tool`, when given) wrote it from the TracIn run `run` (results.run_id); else None, with
    one line in `notes` saying why (absent folders say nothing)."""
    folder = Path(root) / name
    if not folder.is_dir():
        return None
    inputs = read_inputs(folder)
    owner = tool or (inputs or {}).get("tool")
    if inputs is None or not isinstance(owner, str) or owner_of(folder) != owner or inputs.get("tool") != owner:
        why = f"{folder} skipped: not written by {tool or 'its tool'} (no readable {INPUTS} or owner marker)"
    else:
        why = stale(inputs, run, folder)
    if why is None:
        return folder
    if notes is not None:
        notes.append(why)
    return None


def run_folder_path(results) -> Path:
    """The run folder of a TracInResults or of a run folder's path (nothing loaded)."""
    return Path(results) if isinstance(results, (str, os.PathLike)) else Path(results.path)


def run_of(results) -> tuple[Path, str]:
    """(run folder, run id) of a loaded TracInResults, or of a run folder's path (loaded checked)."""
    from TracIn.core.results import load_results, run_id

    if isinstance(results, (str, os.PathLike)):
        results = load_results(results)
    return Path(results.path), run_id(results.record)


def tool_output(results, name: str, tool: str, missing: str, notes: list[str] | None = None,
                folder: Path | None = None) -> Path | None:
    """A tool's folder of this run (default run folder/name): the folder, or None / UserError (see `skip`): `missing`
    when absent, the reason when stale or not the tool's."""
    root, run = run_of(results)
    folder = Path(folder) if folder is not None else root / name
    if not folder.is_dir():
        return skip(missing, notes)
    said: list[str] = []
    found = current(folder.parent, folder.name, run, said, tool)
    return found if found is not None else skip(said[0], notes)


def tool_record(results, name: str, missing: str, notes: list[str] | None = None, path=None,
                fix: str = "rerun the tool that wrote it") -> dict | None:
    """A tool's JSON result of this run (default run folder/name; `path`: elsewhere), checked by its own "tracin_run"
    (`stale`): the record, or None / UserError (see `skip`)."""
    from lib.files import read_json

    root, run = run_of(results)
    path = Path(path) if path is not None else root / name
    if not path.is_file():
        return skip(missing, notes)

    value = read_json(path, fix)  # unreadable: refused (lib.cli.skip)
    why = stale(value, run, path)
    return skip(why, notes) if why else value


def remove_derived(root: Path, run_tool: str) -> None:
    """A new TracIn run in `root`: every derived folder goes (through its tool's record), and every file or link a tool
    other than the run's writer `run_tool` claimed at the root (while unchanged)."""
    root = Path(root)
    for folder, tool in derived_folders(root).items():
        OwnedFolder(folder, tool).remove()
    claims = read_claims(root)
    remove_claimed(root, [n for n, e in claims.items() if isinstance(e, dict) and e.get("tool") != run_tool])


def remove_dangling_links(root: Path) -> int:
    """The root's links a tool claimed (lib.ownership) whose target is gone."""
    root = Path(root)
    links = [n for n, e in read_claims(root).items() if isinstance(e, dict) and "link" in e]
    return len(remove_claimed(root, [n for n in links if (root / n).is_symlink() and not (root / n).exists()]))
