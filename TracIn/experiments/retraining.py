"""Retraining the original run without some training images: the one way every removal experiment does it.

    from TracIn.experiments.retraining import Arm, Retrainer, original_settings, run_arms
    retrainer = Retrainer("full", original_settings(ckpt_dir), data_dir, train_list, excluded, out / "arms", out, tool)
    rows = run_arms([Arm("none", no_images, seed=0)], lambda arm: {"accuracy": ...})

clean_and_retrain.py, counterfactual_check.py and lds.py only choose their arms (what to leave out, with which
seed) and what to measure; how an arm is retrained is here:
- full: train.py with the original run's settings (checkpoint_dir/train_args.json), in its own process
  (`python -m train`, as a user runs it), on the training split less the arm's images;
- head: the last checkpoint's backbone kept, fc retrained from a seeded initialisation on the cached penultimate
  features with the original optimiser, schedule and batch size, through training.fit (the loop train.py uses).
The original run's own exclusions (train.py --exclude) stay out of every arm.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from lib.checkpoints import find_checkpoints, load_checkpoint, model_from_checkpoint
from lib.cli import UserError
from lib.data_utils import ImageListDataset, eval_transform, list_split, listing_key, make_loader
from lib.devices import model_to_device, resolve_device
from lib.files import read_json, save_csv, save_npy
from lib.ownership import OwnedFolder
from lib.prediction import predict
from lib.processes import run_child
from lib.training import fit, scheduled_lr

log = logging.getLogger(__name__)
TRAIN_FLAGS = ("arch", "epochs", "batch_size", "learning_rate", "lr_schedule", "weight_decay", "image_size", "weights", "seed", "hflip")


def original_settings(checkpoint_dir: Path, arch: str | None = None, epochs: int | None = None) -> dict:
    """The original run's train.py settings (train_args.json); a given arch or epochs makes the retrains cheaper."""
    path = Path(checkpoint_dir) / "train_args.json"
    if not path.exists():
        raise UserError(f"{checkpoint_dir} has no train_args.json: its checkpoints do not record how they were trained "
                        "(seed, schedule); pass the --checkpoint_dir of a train.py run")
    saved = read_json(path, "retrain with this version of train.py first")
    missing = [k for k in TRAIN_FLAGS if k not in saved]
    if missing:
        raise UserError(f"{path} does not record {', '.join(missing)}; retrain with this version of train.py first")
    settings = {k: saved[k] for k in TRAIN_FLAGS}
    settings.update({k: v for k, v in (("arch", arch), ("epochs", epochs)) if v})
    return settings


def original_exclusions(checkpoint_dir: Path, train_list) -> np.ndarray:
    """The training images the original run left out (train.py --exclude): every retrain leaves them out too.
    Refused when the data changed since that run (the indices would name other images)."""
    saved = read_json(Path(checkpoint_dir) / "train_args.json", "retrain with this version of train.py first")
    excluded = np.asarray((saved.get("excluded") or {}).get("train_idx", []), dtype=np.int64)
    key = saved.get("data_train_key")
    if key is not None and key != listing_key(train_list):
        raise UserError(f"the training data changed since the run in {checkpoint_dir} (content key then {key}, now "
                        f"{listing_key(train_list)}); retrain it on this data first")
    if len(excluded) and key is None:
        raise UserError(f"{checkpoint_dir}/train_args.json records exclusions but not the data they index; retrain with this "
                        "version of train.py first")
    return excluded


def settings_argv(settings: dict) -> list[str]:
    """train.py flags for original_settings()-style settings (the original run's initial weights must still exist)."""
    argv = []
    for k, v in settings.items():
        if k == "weights" and v not in ("imagenet", "none") and not Path(v).exists():
            raise UserError(f"the original run's --weights {v} is gone; cannot train the same way")
        if k == "hflip":
            argv.append("--hflip" if v else "--no-hflip")
        elif v is not None:
            argv += [f"--{k}", str(v)]
    return argv


def train_without(arm_dir: Path, settings: dict, data_dir: str, drop: np.ndarray, train_list, num_workers: int, device: str,
                  tag: str, owner: Path, tool: str) -> Path:
    """train.py with `settings` (see original_settings) on the training split less `drop` (split indices),
    in its own process as a user runs it; returns the last checkpoint.
    A previous arm folder is deleted only inside `owner`, a folder `tool` marked as its own."""
    if arm_dir.exists():
        OwnedFolder(owner, tool).remove(arm_dir)
    arm_dir.mkdir(parents=True)
    exclude = arm_dir / "exclude.csv"
    save_csv(exclude, pd.DataFrame({"train_idx": np.sort(drop), "path": np.asarray(train_list.paths)[np.sort(drop)]}))
    argv = ["--data_dir", data_dir, "--checkpoint_dir", str(arm_dir / "checkpoints"), "--models_dir", str(arm_dir / "models"),
            "--exclude", str(exclude), "--save_checkpoints_every", str(settings["epochs"]), "--num_workers", str(num_workers),
            "--device", device, "--dataset_tag", tag]
    argv += settings_argv(settings)
    rc = run_child([sys.executable, "-m", "train", *argv])  # ends with this process, even if it is killed
    if rc != 0:
        raise UserError(f"retraining the arm in {arm_dir} failed (train.py exit code {rc}; its error is printed above)")
    return find_checkpoints(arm_dir / "checkpoints")[-1]


def retrain_head(x_train: torch.Tensor, y_train: np.ndarray, keep: np.ndarray, settings: dict, seed: int) -> torch.Tensor:
    """fc retrained on frozen features (bias as a column of ones) with train.py's optimiser, schedule and
    batch size, through training.fit; returns the weight (C, F + 1). Float64, CPU: a few seconds at demo size."""
    g = torch.Generator().manual_seed(seed)
    n_feat, n_classes = x_train.shape[1], int(y_train.max()) + 1
    bound = 1.0 / np.sqrt(n_feat - 1)  # nn.Linear's default initialisation
    w = ((torch.rand(n_classes, n_feat, generator=g, dtype=torch.float64) * 2 - 1) * bound).requires_grad_()
    opt = torch.optim.Adam([w], lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
    x, y = x_train[keep], torch.from_numpy(y_train[keep])
    bs = settings["batch_size"]

    def batches(epoch):
        order = torch.randperm(len(x), generator=g)
        for b in range(0, len(x), bs):
            idx = order[b:b + bs]
            yield x[idx], y[idx], idx

    def step(xb, yb):
        logits = xb @ w.T
        return logits, torch.nn.functional.cross_entropy(logits, yb)

    fit(step, opt, batches, settings["epochs"],
        lambda epoch: scheduled_lr(epoch, settings["lr_schedule"], settings["learning_rate"], settings["epochs"]))
    return w.detach()


def full_test_logits(ckpt_path: Path, data_dir: str, num_workers: int, device) -> np.ndarray:
    """The test split's logits through a checkpoint (eval transform, batches of 256)."""
    ckpt = load_checkpoint(ckpt_path)
    model = model_to_device(model_from_checkpoint(ckpt), device)
    listing = list_split(data_dir, "test")
    loader = make_loader(ImageListDataset(listing, eval_transform(ckpt)), 256, False, num_workers, str(device))
    return predict(model, loader, device)["logits"]


@dataclass
class Arm:
    """One retrain of a removal experiment."""
    name: str                 # unique within the experiment; a full retrain's folder under the arms folder
    drop: np.ndarray          # training split indices left out (the original run's exclusions are added)
    seed: int                 # the training seed
    labels: dict = field(default_factory=dict)  # what the experiment records with the arm (method, k, seed number)


class Retrainer:
    """Retrains the original run per Arm, head or full (see the module docstring)."""

    def __init__(self, how: str, settings: dict, data_dir: str, train_list, excluded: np.ndarray, arms_dir: Path, owner: Path,
                 tool: str, num_workers: int = 2, device: str = "auto", features: tuple | None = None):
        if how == "head" and features is None:
            raise ValueError("a head retrainer needs the cached (train, test) features")
        self.how, self.settings, self.data_dir, self.train_list = how, settings, data_dir, train_list
        self.excluded, self.arms_dir, self.owner, self.tool = excluded, Path(arms_dir), Path(owner), tool
        self.num_workers, self.device, self.features = num_workers, device, features

    def left_out(self, arm: Arm) -> np.ndarray:
        return np.union1d(arm.drop, self.excluded).astype(np.int64)

    def checkpoint(self, arm: Arm) -> Path:
        """full: train.py on the arm, its folder kept; the last checkpoint."""
        return train_without(self.arms_dir / arm.name, {**self.settings, "seed": arm.seed}, self.data_dir, self.left_out(arm),
                             self.train_list, self.num_workers, self.device, self.tool, self.owner, self.tool)

    def test_logits(self, arm: Arm, keep_folder: bool = True) -> np.ndarray:
        """(n_test, C) logits of the arm's retrained model on the test split. full: the arm's folder keeps its
        exclude.csv and test_logits.npy (checkpoints and models, a few hundred MB, go), or goes whole."""
        if self.how == "head":
            x_train, x_test = self.features
            keep = np.ones(len(self.train_list.paths), dtype=bool)
            keep[self.left_out(arm)] = False
            return (x_test @ retrain_head(x_train, self.train_list.labels, keep, self.settings, arm.seed).T).numpy()
        last = self.checkpoint(arm)
        logits = full_test_logits(last, self.data_dir, self.num_workers, resolve_device(self.device))
        arm_dir = self.arms_dir / arm.name
        if keep_folder:
            save_npy(arm_dir / "test_logits.npy", logits)
            for sub in ("checkpoints", "models"):
                OwnedFolder(self.owner, self.tool).remove(arm_dir / sub)
        else:
            OwnedFolder(self.owner, self.tool).remove(arm_dir)
        return logits


def run_arms(arms: Iterable[Arm], measure: Callable[[Arm], dict], describe: Callable[[dict], str] = str) -> list[dict]:
    """Each arm in turn: its labels, what `measure` (which retrains it) returns, the seconds it took; one log line each."""
    rows = []
    for arm in arms:
        t0 = time.time()
        row = {**arm.labels, **measure(arm)}
        row["seconds"] = time.time() - t0
        log.info(f"arm {arm.name}: {describe(row)} ({row['seconds']:.1f}s)")
        rows.append(row)
    return rows
