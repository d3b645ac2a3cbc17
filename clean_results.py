"""Remove what the pipeline wrote, and only that: `make clean-results` runs it.

    $ python clean_results.py      # TracIn/results, false_predictions, models/checkpoints, models/evaluation

A file or folder goes only when the tool that wrote it marked it as its own, checked at the moment of deletion:
folders with a tool's marker (factor caches, the run folder's tool subfolders, Grad-CAM maps) and the links into them,
files and links a tool claimed, while they are exactly what it wrote (lib.ownership.claim_files; a TracIn run's
files among them), and train.py's checkpoints in a folder train.py marked. Anything else (a user's notes, photos,
weights, the tracked READMEs) stays where it is.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lib.checkpoints import find_checkpoints
from lib.cli import cli
from lib.ownership import OWNER_MARKER, owned_by, read_claims, remove_claimed, remove_inside_owned, remove_owned
from TracIn.core.run_folder import remove_dangling_links

log = logging.getLogger(__name__)
TRAIN_FILES = ("last.pth", "training_dynamics.npz", "train_args.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="TracIn/results", help="TracIn results (default TracIn/results)")
    p.add_argument("--false_predictions", default="false_predictions", help="false_prediction.py output (default false_predictions)")
    p.add_argument("--checkpoint_dir", default="models/checkpoints", help="train.py checkpoints (default models/checkpoints)")
    p.add_argument("--eval_dir", default="models/evaluation", help="evaluate.py output (default models/evaluation)")
    return p.parse_args(argv)


def clean_folder(folder: Path) -> int:
    """One output folder: nested TracIn runs (raw/, normalized/), claimed files, subfolders with a tool's marker, and
    the folder's own TracIn run. Returns how many files and folders went."""
    if not folder.is_dir() or folder.is_symlink():
        return 0
    n = 0
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        marker = sub / OWNER_MARKER
        if marker.is_file():
            n += remove_owned(sub, marker.read_text().strip())
        elif (sub / "run.json").is_file():
            n += clean_folder(sub)
    n += remove_dangling_links(folder)
    n += len(remove_claimed(folder, list(read_claims(folder))))  # a TracIn run's files and links among them
    return n


def clean(args) -> int:
    n = sum(clean_folder(Path(d)) for d in (args.results_dir, args.false_predictions, args.eval_dir))
    ckpt = Path(args.checkpoint_dir)
    if ckpt.is_dir() and owned_by(ckpt, "train.py"):
        for path in find_checkpoints(ckpt) + [ckpt / name for name in TRAIN_FILES]:
            if path.is_file() and not path.is_symlink():
                remove_inside_owned(path, ckpt, "train.py")
                n += 1
    return n


def main(argv=None):
    n = clean(parse_args(argv))
    log.info(f"clean-results: removed {n} file(s) and folder(s) the pipeline wrote; everything else stays")
    return 0


if __name__ == "__main__":
    cli(main)
