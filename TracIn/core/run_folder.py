"""The run folder: one TracIn run at its root (results.py writes it), and one subfolder per tool that works from it.
Which folder and file hold what is told once, in README.md's "Where outputs land".

Each tool subfolder is built beside its place and swapped in whole (lib.ownership.Owner.folder), marked as the tool's own, and
carries `inputs.json`: the TracIn run it was computed from (results.run_id) and the tool's other inputs. A new TracIn
run removes every subfolder its tool marked (never a folder of yours of the same name) and the links into them, so
nothing derived from the previous run survives it; a reader calls `current()` and skips (or refuses) a subfolder of
another run with one line saying which.

    from TracIn.core.run_folder import current
    mislabel = current("TracIn/results", "mislabel", run_id(record), notes)   # the folder, or None with a note
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator

from lib.files import save_json
from lib.ownership import OwnedFolder, Owner, claimed, owner_of, remove_claimed

INPUTS = "inputs.json"
# subfolder -> the tool that writes it (its owner marker)
TOOL_FOLDERS = {"mislabel": "mislabel_detection", "misprediction": "analyze_misprediction_influences",
                "analysis": "analyze_topk_results", "gradcam": "gradCAM_evaluation", "counterfactual": "counterfactual_check",
                "clean_and_retrain": "clean_and_retrain", "lds": "lds", "report": "report",
                "explain": "explain"}
# the seed's notebook paths at the root, kept as links into the folder that now holds them
NOTEBOOK_LINKS = {"mislabel_candidates.csv": "mislabel", "misprediction_influence_analysis.csv": "misprediction",
                  "misprediction_cross_analysis.csv": "misprediction"}


@contextlib.contextmanager
def tool_folder(out: Path, tool: str, inputs: dict, flag: str = "--out_dir") -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `out` whole, with inputs.json ({"tool", **inputs}; inputs
    holds "tracin_run"), and the root's notebook links into `out` are refreshed. On failure `out` stays as it was."""
    out = Path(out)
    with Owner(tool).folder(out, flag) as build:
        yield build
        save_json(build / INPUTS, {"tool": tool, **inputs})
    link_notebook_paths(out, tool)


def link_notebook_paths(out: Path, tool: str) -> list[str]:
    """Where `out` is a run folder's tool subfolder, point the root's notebook paths for it at its files. A link is
    made or replaced only where the name is free or holds the link a tool claimed there (lib.ownership); a file or a
    link of yours of that name (dangling or pointing elsewhere) stays, said."""
    import logging

    root, made = out.parent, []
    for name, sub in NOTEBOOK_LINKS.items():
        if out.name != sub or not (out / name).is_file() or not (root / "run.json").exists():
            continue
        link = root / name
        ours = claimed(root, name)
        if (link.exists() or link.is_symlink()) and not ours:
            what = f"a link of yours (to {os.readlink(link)})" if link.is_symlink() else "a file that is not a link"
            logging.getLogger(__name__).warning(f"warning: {link} is {what}; left as it is, the table is {out / name}")
            continue
        tmp = root / f".{name}.{uuid.uuid4().hex[:12]}.link"  # a fresh name: nothing to delete first
        os.symlink(f"{sub}/{name}", tmp)
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


def current(root: Path, name: str, run: str, notes: list[str] | None = None) -> Path | None:
    """results_dir/name when its tool wrote it from the TracIn run `run` (results.run_id); else None, with one line in
    `notes` saying why (absent folders say nothing)."""
    folder = Path(root) / name
    if not folder.is_dir():
        return None
    inputs = read_inputs(folder)
    if inputs is None or owner_of(folder) != TOOL_FOLDERS.get(name, inputs.get("tool", "")):
        why = f"{folder} skipped: not written by {TOOL_FOLDERS.get(name, 'its tool')} (no readable {INPUTS} or owner marker)"
    elif inputs.get("tracin_run") != run:
        why = (f"{folder} skipped: it was computed from another TracIn run ({inputs.get('tracin_run') or 'unknown'}, this one "
               f"is {run}); rerun the tool that wrote it")
    else:
        return folder
    if notes is not None:
        notes.append(why)
    return None


def remove_derived(root: Path) -> None:
    """A new TracIn run in `root`: every tool subfolder its tool marked goes, and the root's links into them."""
    root = Path(root)
    for name, tool in TOOL_FOLDERS.items():
        if (root / name).is_dir() and not (root / name).is_symlink() and owner_of(root / name) == tool:
            OwnedFolder(root / name, tool).remove()
    remove_dangling_links(root)


def remove_dangling_links(root: Path) -> int:
    """The root's notebook links whose tool folder is gone, where a tool claimed them (lib.ownership)."""
    root = Path(root)
    return len(remove_claimed(root, [n for n in NOTEBOOK_LINKS if (root / n).is_symlink() and not (root / n).exists()]))
