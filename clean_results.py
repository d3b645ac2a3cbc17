"""Remove what the pipeline's result tools wrote, and only what they can prove they wrote: `make clean-results` runs it.

    $ python clean_results.py      # TracIn/results, false_predictions, models/checkpoints, models/evaluation

A file goes only while its content is what its tool recorded writing (lib.ownership.OwnedFolder.remove: size and sha256
recorded at write time; a link, its target); a folder goes only once nothing else is left in it. A marker alone removes
nothing. Under --results_dir, --false_predictions and --eval_dir only the result tools' folders (the factor cache,
the run folder's tool subfolders, Grad-CAM maps) and the files and links claimed in those folders are cleaned; a folder
of another tool there (a prepared data set, train.py's checkpoints, an ensemble's members) is left, said. Under
--checkpoint_dir, train.py's recorded checkpoints and records. A user's file inside a tool's folder stays, said.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lib.cli import cli
from lib.ownership import OwnedFolder, owner_of, read_claims, remove_claimed
from TracIn.core.factors import OWNER as TRACIN
from train import OWNER as TRAIN
from TracIn.core.run_folder import derived_tool, remove_dangling_links

log = logging.getLogger(__name__)
# the tools whose marked folders are results (rebuilt by rerunning them): these, and every tool folder derived from a
# TracIn run (run_folder.derived_tool: its inputs.json says so); train.py, prepare_data.py and the ensemble's members are
# models and data, cleaned only by their own flag (--checkpoint_dir) or not at all
RESULT_TOOLS = {TRACIN.name, "gradCAM_evaluation"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="TracIn/results", help="TracIn results (default TracIn/results)")
    p.add_argument("--false_predictions", default="false_predictions", help="false_prediction.py output (default false_predictions)")
    p.add_argument("--checkpoint_dir", default="models/checkpoints", help="train.py checkpoints (default models/checkpoints)")
    p.add_argument("--eval_dir", default="models/evaluation", help="evaluate.py output (default models/evaluation)")
    return p.parse_args(argv)


def files_in(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def clean_owned(folder: Path, tool: str) -> int:
    """A folder `tool` marked: its recorded files that are unchanged (the rest stays, said). Returns how many went."""
    before = files_in(folder)
    OwnedFolder(folder, tool).remove()
    return before - files_in(folder)


def clean_marked(folder: Path, tool: str) -> int:
    """A folder `tool` marked as its own: cleaned when it is a result (RESULT_TOOLS, or derived from a TracIn run), else
    left, said (a prepared data set, train.py's checkpoints, an ensemble's members)."""
    if tool in RESULT_TOOLS or tool == derived_tool(folder):
        return clean_owned(folder, tool)
    log.info(f"clean-results: {folder} is {tool}'s folder, not a result; left as it is")
    return 0


def clean_folder(folder: Path) -> int:
    """One output folder (a shared one, never removed itself): its result tools' subfolders, nested TracIn runs
    (raw/, normalized/), and the files and links claimed in it. A folder a tool marked as its own, passed here, is
    that tool's folder, not a shared one (`clean_marked`). Returns how many files went."""
    if not folder.is_dir() or folder.is_symlink():
        return 0
    if owner_of(folder) is not None:
        return clean_marked(folder, owner_of(folder))
    n = 0
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        tool = owner_of(sub)
        if tool is not None:
            n += clean_marked(sub, tool)
        elif (sub / "run.json").is_file():
            n += clean_folder(sub)
    n += remove_dangling_links(folder)
    claims = list(read_claims(folder))
    removed = remove_claimed(folder, claims)  # a TracIn run's files and links among them
    kept = [c for c in claims if c not in removed and ((folder / c).exists() or (folder / c).is_symlink())]
    if kept:
        log.warning(f"clean-results: kept in {folder}, changed since their tool wrote them (yours now): {', '.join(kept[:8])}"
                    + (f" and {len(kept) - 8} more" if len(kept) > 8 else ""))
    return n + len(removed)


def clean(args) -> int:
    n = sum(clean_folder(Path(d)) for d in (args.results_dir, args.false_predictions, args.eval_dir))
    ckpt = Path(args.checkpoint_dir)
    if ckpt.is_dir() and not ckpt.is_symlink() and owner_of(ckpt) == TRAIN.name:
        n += clean_owned(ckpt, TRAIN.name)
    elif ckpt.is_dir() and owner_of(ckpt) is not None:
        log.info(f"clean-results: --checkpoint_dir {ckpt} is {owner_of(ckpt)}'s folder, not {TRAIN.name}'s; left as it is")
    return n


def main(argv=None):
    n = clean(parse_args(argv))
    log.info(f"clean-results: removed {n} file(s) the pipeline recorded writing and that are unchanged since; "
             "anything else stays")
    return 0


if __name__ == "__main__":
    cli(main)
