"""Ensemble members: more training runs of the original run, each with a seed of its own, for efficient_tracin --members.

    $ python -m TracIn.ensemble --members 4                    # member_1..3 in models/members, beside the original
    $ python -m TracIn.ensemble --members 4 --jobs 2           # two members at a time (the CPU threads shared out)
    $ python -m TracIn.efficient_tracin --members models/checkpoints models/members/member_{1,2,3}/checkpoints
    $ sbatch --array=1-3 slurm_train_ensemble.sh               # on a cluster: one member per array task
    $ python -m TracIn.ensemble --members 4 --fork_epoch 1     # cheap members: forks of the original after epoch 1

Member 0 is the original run (--checkpoint_dir). Member k >= 1 is train.py with the original run's train_args.json
(architecture, epochs, batch size, learning rate and schedule, weight decay, image size, initial weights, flips, the
images it left out and its checkpoint schedule) and seed original + k, which changes the initialisation of the new
layers and the order and augmentation of every epoch, in out_dir/member_k/checkpoints. A member killed mid-training
continues (train.py --resume, the very weights of an uninterrupted run) when this is run again; a finished one is
kept. A fork (--fork_epoch N) is cheaper: member k starts from the original run's checkpoint of epoch N (train.py
--fork_from) and trains epochs N+1.. with seed original + k and a fresh optimizer, so it costs (epochs - N) / epochs
of a training; its checkpoints are its own epochs, its training dynamics the original's first N epochs then its own.
The scores over members (their mean) are efficient_tracin's; docs/ensembles.md measures what they pay.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from lib.checkpoints import find_checkpoints
from lib.cli import UserError, cli, nonneg_int, positive_int
from lib.data_utils import list_split
from lib.files import read_json, save_csv
from lib.ownership import Owner
from lib.processes import child_process, end_children
from TracIn.experiments.retraining import original_exclusions, original_settings, settings_argv

log = logging.getLogger(__name__)
TOOL = "ensemble"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint_dir", default="models/checkpoints", help="the original run: member 0 (default models/checkpoints)")
    p.add_argument("--data_dir", default=None, help="prepared data (default: the original run's)")
    p.add_argument("--out_dir", default=None,
                   help="member_k/ folders go here (default models/members, or models/forks with --fork_epoch)")
    p.add_argument("--members", type=positive_int, default=4, help="members in all, the original run included (default 4)")
    p.add_argument("--only", type=positive_int, default=None, help="train member k alone (a Slurm array task)")
    p.add_argument("--jobs", type=positive_int, default=1, help="members trained at once, local processes (default 1)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="loader workers per member (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--fork_epoch", type=nonneg_int, default=0,
                   help="0: independent members (default); N: forks of the original run's epoch-N checkpoint")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or ("models/forks" if args.fork_epoch else "models/members")
    if args.members < 2:
        raise UserError("--members counts the original run: pass 2 or more to train another member")
    if args.only is not None and not 1 <= args.only < args.members:
        raise UserError(f"--only {args.only}: members are 1..{args.members - 1} (member 0 is the original run)")
    if args.jobs > args.members - 1:
        raise UserError(f"--jobs {args.jobs} is more processes than the {args.members - 1} member(s) to train")
    return args


def member_argv(k: int, original: Path, out: Path, data_dir: str, num_workers: int, device: str,
                fork_epoch: int = 0) -> list[str]:
    """train.py's arguments for member k: the original run's settings, seed + k, its own folders (a fork: from the
    original's checkpoint of epoch fork_epoch)."""
    saved = read_json(original / "train_args.json", "retrain the original run with this version of train.py")
    settings = original_settings(original)
    folder = out / f"member_{k}"
    argv = ["--data_dir", data_dir, "--checkpoint_dir", str(folder / "checkpoints"), "--models_dir", str(folder / "models"),
            "--save_checkpoints_every", str(saved.get("save_checkpoints_every", settings["epochs"])),
            "--num_workers", str(num_workers), "--device", device, "--dataset_tag", f"member{k}"]
    settings["seed"] = int(settings["seed"]) + k
    argv += settings_argv(settings)
    excluded = original_exclusions(original, list_split(data_dir, "train"))
    if len(excluded):  # the images the original run left out, left out of every member
        folder.mkdir(parents=True, exist_ok=True)
        paths = np.asarray(list_split(data_dir, "train").paths)[excluded]
        save_csv(folder / "exclude.csv", pd.DataFrame({"train_idx": excluded, "path": paths}))
        argv += ["--exclude", str(folder / "exclude.csv")]
    if fork_epoch:
        argv += ["--fork_from", str(original / f"finetune_epoch_{fork_epoch}.pth")]
    return argv


def state(folder: Path, epochs: int) -> str:
    """done (its last checkpoint is there), partial (last.pth: --resume) or new."""
    ckpts = find_checkpoints(folder / "checkpoints") if (folder / "checkpoints").is_dir() else []
    if ckpts and int(ckpts[-1].stem.rsplit("_", 1)[1]) >= epochs:
        return "done"
    return "partial" if (folder / "checkpoints" / "last.pth").exists() else "new"


def train_members(args) -> list[Path]:
    original = Path(args.checkpoint_dir)
    saved = read_json(original / "train_args.json", "pass the --checkpoint_dir of a train.py run") \
        if (original / "train_args.json").exists() else None
    if saved is None:
        raise UserError(f"{original} has no train_args.json: members repeat a train.py run; pass its --checkpoint_dir")
    data_dir = args.data_dir or saved["data_dir"]
    epochs = int(saved["epochs"])
    if args.fork_epoch and not (original / f"finetune_epoch_{args.fork_epoch}.pth").exists():
        have = ", ".join(p.stem.rsplit("_", 1)[1] for p in find_checkpoints(original)) or "none"
        raise UserError(f"--fork_epoch {args.fork_epoch}: {original} has no finetune_epoch_{args.fork_epoch}.pth "
                        f"(checkpoints of epochs: {have}); pass one of those epochs before the last")
    if args.fork_epoch >= epochs:
        raise UserError(f"--fork_epoch {args.fork_epoch}: the original run trains {epochs} epochs; a fork starts before the last")
    out = Owner(TOOL).folder(Path(args.out_dir), "--out_dir").fill().path
    todo = [args.only] if args.only else list(range(1, args.members))
    jobs = []
    for k in todo:
        folder = out / f"member_{k}"
        st = state(folder, epochs)
        if st != "new":  # a member of this kind (independent, or a fork of this epoch) or refused
            was = (read_json(folder / "checkpoints" / "train_args.json", "delete it or pass another --out_dir")
                   if (folder / "checkpoints" / "train_args.json").exists() else {}).get("forked") or {}
            if int(was.get("epoch", 0)) != args.fork_epoch:
                raise UserError(f"{folder} holds a member of another kind ({'fork of epoch ' + str(was['epoch']) if was else 'independent'}); "
                                "pass another --out_dir")
        if st == "done":
            log.info(f"member {k}: finished ({folder}), kept")
            continue
        argv = member_argv(k, original, out, data_dir, args.num_workers, args.device, args.fork_epoch) \
            + (["--resume"] if st == "partial" else [])
        jobs.append((k, folder, argv))
    threads = str(max(1, (os.cpu_count() or 1) // max(1, min(args.jobs, len(jobs) or 1))))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    failed, running = [], []
    try:
        while jobs or running:
            while jobs and len(running) < args.jobs:
                k, folder, argv = jobs.pop(0)
                folder.mkdir(parents=True, exist_ok=True)
                log.info(f"member {k}: training ({'resumed' if '--resume' in argv else 'new'}) in {folder}")
                with open(folder / "train.log", "a") as f:
                    running.append((k, folder, child_process([sys.executable, "-m", "train", *argv], env=env, stdout=f,
                                                             stderr=f)))
            k, folder, p = running.pop(0)
            if p.wait() != 0:
                failed.append((k, folder))
    finally:  # interrupted: the members in training end too (each resumes when this runs again)
        end_children([p for _, _, p in running])
    if failed:
        k, folder = failed[0]
        lines = (folder / "train.log").read_text().strip().splitlines() or ["(no output)"]
        raise UserError(f"member(s) {', '.join(str(k) for k, _ in failed)} failed ({folder / 'train.log'}): {lines[-1]}")
    return [original] + [out / f"member_{k}" / "checkpoints" for k in range(1, args.members)]


def main(argv=None):
    args = parse_args(argv)
    folders = train_members(args)
    log.info("members ready; score them together with:\n  python -m TracIn.efficient_tracin --members "
             + " ".join(str(f) for f in folders))
    return 0


if __name__ == "__main__":
    cli(main)
