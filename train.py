"""Fine-tune a torchvision ResNet on a prepared image folder, saving checkpoints for TracIn.

    $ python train.py --data_dir data/processed --epochs 80 --batch_size 32 \
        --learning_rate 1e-4 --save_checkpoints_every 10
    $ python train.py --resume                        # continue a killed run
    $ torchrun --nproc_per_node=2 train.py ...        # DistributedDataParallel (gloo on CPU, NCCL on GPU)

Writes checkpoint_dir/finetune_epoch_{N}.pth every N epochs (and at the last epoch),
checkpoint_dir/training_dynamics.npz (per image and epoch: loss, margin, correct),
checkpoint_dir/last.pth every epoch (for --resume), and the best model (by accuracy, then loss, on the
val split that prepare_data.py holds out; on test, with a warning, for data prepared with --val_fraction 0)
as models/<Arch>_<tag>_val_<acc>_<loss>.pth, named in models/best_model.txt: a checkpoint of the run at its epoch,
also named (with its weights' identity) in checkpoint_dir/selected_model.json, which TracIn reads to explain the
trajectory up to that model. evaluate.py reports the test split.
One greppable line per epoch: `epoch 3/80 | lr ... | train_loss ... | val_acc ...`.

Why one script of about 450 lines: a training run stays one readable file (arguments, exact resume, what each batch and
epoch records, checkpoints), as nanoGPT keeps its scripts flat; the loop itself is training.fit, shared with every
retrain, and retraining tools run this script as a process (`python -m train`).
"""
from __future__ import annotations

import argparse
import logging
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib.checkpoints import (SELECTED, best_model_name, find_checkpoints, load_checkpoint, make_checkpoint, model_record,
                             save_checkpoint)
from lib.cli import (UserError, at_least_two, cli, image_side, nonneg_float, nonneg_int, plain_name, positive_float,
                     positive_int)
from lib.data_utils import (ImageListDataset, IMAGENET_MEAN, IMAGENET_STD, build_transform, list_split, listing_key,
                            make_loader, read_exclusions, split_key)
from lib.devices import autocast, batch_to_device, model_to_device, set_seed
from lib.files import atomic_path, ensure_output_dir, file_sha256, git_commit, read_json, save_json
from lib.ownership import Owner, remove_claimed
from lib.prediction import metrics_from_logits, predict
from lib.training import SAME_SETTINGS, Dist, fit, scheduled_lr
from lib.training_dynamics import DynamicsRecorder, load_dynamics
from lib.models import ARCHS, PRETRAINED_DIR, PRETRAINED_FILES, build_model

log = logging.getLogger(__name__)
OWNER = Owner("train.py")  # its checkpoint folders' marker


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--data_dir", default="data/processed", help="prepared data with train/ and test/ (default data/processed)")
    p.add_argument("--arch", choices=ARCHS, default="resnet50", help="torchvision architecture (default resnet50)")
    p.add_argument("--epochs", type=positive_int, default=80, help="training epochs (default 80)")
    p.add_argument("--batch_size", type=at_least_two, default=32, help="batch size per process, >= 2 for batch norm (default 32)")
    p.add_argument("--learning_rate", type=positive_float, default=1e-4, help="peak Adam learning rate (default 1e-4)")
    p.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant", help="learning-rate schedule over epochs (default constant)")
    p.add_argument("--weight_decay", type=nonneg_float, default=0.0, help="Adam weight decay (default 0)")
    p.add_argument("--save_checkpoints_every", type=positive_int, default=10, help="save finetune_epoch_N.pth every N epochs (default 10)")
    p.add_argument("--checkpoint_dir", default="models/checkpoints", help="checkpoint folder (default models/checkpoints)")
    p.add_argument("--models_dir", default="models", help="where the best model goes (default models)")
    p.add_argument("--dataset_tag", type=plain_name, default="animals10",
                   help="data set name in the best model's file name; letters, digits, '.', '_', '-' (default animals10)")
    p.add_argument("--image_size", type=image_side, default=None, help="input size (default: the size prepare_data.py used, else 224)")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet (file in models/pretrained/, from download_weights.py), none, or a PATH to a state_dict (default imagenet)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips (default on)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="data loader workers (default 2)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_dir/last.pth")
    p.add_argument("--exclude", default=None,
                   help="CSV of training images to leave out (column train_idx or path; with a decision column only rows "
                        "marked drop); default none")
    p.add_argument("--fork_from", default=None,
                   help="a checkpoint (finetune_epoch_N.pth) of another run of these settings (its train_args.json's "
                        "learning rate, schedule, batch size, weight decay, epochs, image size and flips; refused when one "
                        "differs) to continue from: its weights and epoch N, a fresh optimizer, this --seed's data order for epochs N+1.. (an ensemble's cheap "
                        "member, TracIn.ensemble --fork_epoch); default none")
    p.add_argument("--overwrite", action="store_true", help="delete earlier checkpoints in checkpoint_dir instead of refusing")
    args = p.parse_args(argv)
    args.given = given_flags(argv)
    return args


def given_flags(argv) -> set[str]:
    """The destinations of the flags written on the command line (not left at their defaults)."""
    import sys

    names = set()
    for token in sys.argv[1:] if argv is None else argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            names.add((name[3:] if name.startswith("no-") else name).replace("-", "_"))
    return names


def resolve_weights(arch: str, weights: str) -> str | None:
    if weights == "none":
        return None
    if weights == "imagenet":
        path = PRETRAINED_DIR / PRETRAINED_FILES[arch]
        if path.exists():
            return str(path)
        log.warning(f"warning: no ImageNet weights at {path} (run download_weights.py --arch {arch}); training {arch} from scratch")
        return None
    if not Path(weights).exists():
        raise UserError(f"--weights {weights}: no such file (use imagenet, none or a path)")
    return weights


def lr_at(epoch: int, args) -> float:
    """Learning rate during 1-based `epoch` (lib.training.scheduled_lr with train.py's flags)."""
    return scheduled_lr(epoch, args.lr_schedule, args.learning_rate, args.epochs)


# What defines a training run: a --resume must continue it with the very same settings.
RESUME_KEYS = ("data_dir", "arch", "epochs", "batch_size", "learning_rate", "lr_schedule", "weight_decay",
               "save_checkpoints_every", "image_size", "weights", "hflip", "seed", "exclude", "fork_from")
RESUME_MAY_CHANGE = ("epochs",)  # continuing a run for more epochs is what --resume is for; said and recorded


def resume_settings(args, ckpt_dir: Path) -> str:
    """--resume: flags not given take the run's saved values; a given flag that differs is refused. Returns the run id."""
    saved_path = ckpt_dir / "train_args.json"
    if not saved_path.exists():
        raise UserError(f"--resume: no {saved_path}; this folder holds no train.py run to continue")
    saved = read_json(saved_path, "start over with --overwrite")
    same = lambda k, a, b: (str(Path(a).resolve()) == str(Path(b).resolve())) if k in ("data_dir", "exclude") and a and b else a == b
    given = getattr(args, "given", set())
    differ = [k for k in RESUME_KEYS if k in saved and k in given and not same(k, getattr(args, k), saved[k])]
    said = [k for k in differ if k in RESUME_MAY_CHANGE]
    differ = [k for k in differ if k not in RESUME_MAY_CHANGE]
    if said:  # more (or fewer) epochs: allowed, said here and recorded in train_args.json
        args.changed_on_resume = list(saved.get("changed_on_resume", [])) + [
            {k: {"run": saved[k], "now": getattr(args, k)} for k in said}]
        log.warning("warning: --resume with " + ", ".join(f"--{k} {getattr(args, k)} (run: {saved[k]})" for k in said)
                    + "; recorded in train_args.json")
    elif saved.get("changed_on_resume"):
        args.changed_on_resume = saved["changed_on_resume"]
    if differ:
        raise UserError("--resume continues the run in " + str(ckpt_dir) + " with its own settings; these differ: "
                        + ", ".join(f"--{k} {getattr(args, k)} (run: {saved[k]})" for k in differ)
                        + "; drop them, or start a new run with --overwrite or another --checkpoint_dir")
    for k in RESUME_KEYS:
        if k in saved and k not in given:
            setattr(args, k, saved[k])
    return saved.get("train_run") or uuid.uuid4().hex[:16]


# What a fork keeps of the run it continues: the optimisation and the inputs (the seed, and so the data order, is its own).
FORK_SAME = SAME_SETTINGS


def load_fork(args, ckpt_dir: Path, class_names: list[str], train_list) -> dict:
    """--fork_from: the checkpoint to continue from, checked to be an earlier epoch of a run of this model, classes,
    training split and training settings (its folder's train_args.json: FORK_SAME); with the training dynamics of its
    epochs (read from its folder, recorded by the same run)."""
    path = Path(args.fork_from)
    if path.resolve().parent == ckpt_dir.resolve():
        raise UserError(f"--fork_from {path} is in --checkpoint_dir {ckpt_dir}; a fork trains into a folder of its own")
    ckpt = load_checkpoint(path, class_names=class_names, arch=args.arch)
    epoch, run = int(ckpt["epoch"]), ckpt.get("train_run")
    if epoch >= args.epochs:
        raise UserError(f"--fork_from {path} is of epoch {epoch}; a fork of a {args.epochs}-epoch run starts before its last epoch")
    if ckpt.get("split_key") != split_key(args.data_dir):
        raise UserError(f"--fork_from {path} was trained on another split of the data than {args.data_dir}; fork a run of this data")
    saved_path = path.parent / "train_args.json"
    if not saved_path.exists():
        raise UserError(f"--fork_from {path}: no {saved_path} beside it, so its run's settings are unknown; fork a train.py run")
    saved = read_json(saved_path, "fork a run of this version of train.py")
    if saved.get("train_run") != run:
        raise UserError(f"--fork_from {path} is not of the run {saved_path} records (retrained since?); fork a checkpoint of that run")
    differ = [k for k in FORK_SAME if saved.get(k) != getattr(args, k)]
    if differ:
        raise UserError(f"--fork_from {path} continues a run of other settings: " + ", ".join(
            f"--{k} {getattr(args, k)} (run: {saved.get(k)})" for k in differ) + "; pass the run's settings")
    dyn = load_dynamics(path.parent, len(train_list.paths), class_names, required=True, train_runs=[run])
    if len(dyn["loss"]) < epoch:
        raise UserError(f"{path.parent}/training_dynamics.npz records {len(dyn['loss'])} epochs, fewer than the checkpoint's {epoch}")
    return {"model_state": ckpt["model_state"], "epoch": epoch, "dynamics": dyn,
            "record": {"path": str(path), "sha256": file_sha256(path), "epoch": epoch, "train_run": run}}


@dataclass(frozen=True)
class RunStart:
    """How a training run starts. kind: "fresh" (new weights), "resume" (--resume: last.pth of this folder) or "fork"
    (--fork_from: another run's checkpoint); overwrite: the folder's earlier checkpoints go first (--overwrite)."""
    kind: str
    overwrite: bool = False


def decide_start(resume: bool, fork_from: str | None, overwrite: bool, ckpt_dir: Path) -> RunStart:
    """How a run starts, from the flags and what the checkpoint folder holds; a folder of checkpoints is resumed or,
    with --overwrite, started over, never trained into silently."""
    ckpt_dir = Path(ckpt_dir)
    if resume:
        if not (ckpt_dir / "last.pth").exists():
            raise UserError(f"--resume: no {ckpt_dir / 'last.pth'} to resume from")
        return RunStart("resume")
    kind = "fork" if fork_from else "fresh"
    if find_checkpoints(ckpt_dir) or (ckpt_dir / "last.pth").exists():
        if not overwrite:
            raise UserError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue them or --overwrite to start over")
        return RunStart(kind, overwrite=True)
    return RunStart(kind)


def written_by_train(path: Path) -> bool:
    """Whether a file is a checkpoint train.py wrote (a best model of an earlier run of these settings may be replaced)."""
    try:
        return bool(load_checkpoint(path).get("train_run"))
    except UserError:
        return False


@dataclass
class TrainingData:
    """The splits a run trains on and selects its model on (val, else test), and the training images it leaves out."""
    train_list: object
    test_list: object
    select_list: object
    selection: str
    excluded: np.ndarray
    kept: np.ndarray

    @property
    def class_names(self) -> list[str]:
        return self.train_list.class_names


def training_data(args, main: bool) -> TrainingData:
    """The prepared splits, checked to share their classes, and --exclude; --image_size defaults to the prepared size."""
    train_list, test_list = list_split(args.data_dir, "train"), list_split(args.data_dir, "test")
    if train_list.class_names != test_list.class_names:
        raise UserError(f"train and test class folders differ in {args.data_dir}")
    # The best model is selected on val/ (prepare_data.py --val_fraction); without one, on test as the seed did, said.
    selection = "val" if (Path(args.data_dir) / "val").is_dir() else "test"
    select_list = list_split(args.data_dir, "val") if selection == "val" else test_list
    if select_list.class_names != train_list.class_names:
        raise UserError(f"train and val class folders differ in {args.data_dir}; re-prepare it")
    if selection == "test" and main:
        log.warning(f"{args.data_dir} has no val split: the best model is selected on the test split (optimistic test "
                    "accuracy); prepare with --val_fraction > 0 for an untouched test split")
    # checked before anything is replaced: a bad exclusion list changes nothing
    excluded = read_exclusions(args.exclude, train_list) if args.exclude else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(train_list.paths)), excluded)
    if len(kept) < 2:
        raise UserError(f"--exclude {args.exclude} leaves {len(kept)} of {len(train_list.paths)} training images; "
                        "training needs at least 2 (batch norm)")
    if args.image_size is None:
        prep = Path(args.data_dir) / "prepare_args.json"
        args.image_size = int(read_json(prep, f"re-prepare {args.data_dir}").get("image_size", 224)) if prep.exists() else 224
    return TrainingData(train_list, test_list, select_list, selection, excluded, kept)


@dataclass
class StartingPoint:
    """Where the epochs start: the epoch, the rates so far, the best model so far, and the state continued (last.pth
    of --resume, the checkpoint of --fork_from; None for a fresh run) with the fork's record."""
    start_epoch: int
    lr_history: list
    best: dict
    resume: dict | None
    fork: dict | None
    forked: dict | None


def starting_point(args, start: RunStart, ckpt_dir: Path, data: TrainingData, ckpt, main: bool) -> StartingPoint:
    """The state a run starts from (decide_start chose how), checked before anything in the folder is replaced; with
    --overwrite, only the files train.py recorded writing go (anything else in the folder stays)."""
    # A fork (--fork_from) continues another run's checkpoint of epoch N; checked before anything here is replaced.
    fork = load_fork(args, ckpt_dir, data.class_names, data.train_list) if start.kind == "fork" else None
    start_epoch, lr_history, best = 1, [], {"acc": -1.0, "loss": float("inf"), "path": None}
    resume = None
    if start.kind == "resume":
        resume = load_checkpoint(ckpt_dir / "last.pth", class_names=data.class_names, arch=args.arch)
        saved_key = read_json(ckpt_dir / "train_args.json", "start over with --overwrite").get("data_train_key")
        if saved_key and saved_key != listing_key(data.train_list):
            raise UserError(f"--resume: the training split of {args.data_dir} changed since this run started (re-prepared or "
                            "edited); continuing would mix two data sets under one run: start a new run with --overwrite")
        if args.epochs < resume["epoch"]:
            raise UserError(f"--resume --epochs {args.epochs}: this run has already trained {resume['epoch']} epochs; "
                            f"pass --epochs {resume['epoch']} or more")
        start_epoch = resume["epoch"] + 1
        lr_history = list(resume["lr_history"])
        best = dict(resume["best"])
        if best.get("path") in ("", None):
            best["path"] = None
    elif start.overwrite and main:
        for p in find_checkpoints(ckpt_dir) + [ckpt_dir / "last.pth", ckpt_dir / SELECTED]:
            ckpt.remove(p)
    if fork:  # its own checkpoints start at epoch N + 1
        start_epoch = fork["epoch"] + 1
        lr_history = [lr_at(e, args) for e in range(1, start_epoch)]
    forked = fork["record"] if fork else (read_json(ckpt_dir / "train_args.json", "start over with --overwrite").get("forked")
                                          if resume else None)
    return StartingPoint(start_epoch, lr_history, best, resume, fork, forked)


def save_selected(args, module, ckpt_dir: Path, selection: str, epoch: int, lr_t: float, m: dict, common: dict,
                  run_tag: dict) -> dict:
    """The selected model: the best-model file is a checkpoint of this run at its epoch (weighted like one, by the
    mean rate since the previous checkpoint), and checkpoint_dir/selected_model.json names it, so that TracIn
    explains the trajectory up to the model evaluate.py reports."""
    models_dir = Path(args.models_dir)
    path = models_dir / best_model_name(args.arch, args.dataset_tag, m["accuracy"], m["loss"])
    ckpt = make_checkpoint(module, lr=lr_t, **common, metadata=run_tag)
    previous = read_json(ckpt_dir / SELECTED, "start over with --overwrite") if (ckpt_dir / SELECTED).exists() else {}
    if path.exists() and not written_by_train(path):
        raise UserError(f"{path} exists and is not a model train.py wrote; it is left untouched: move it away or pass "
                        "another --models_dir, then continue with --resume")
    save_checkpoint(ckpt, path)
    OWNER.claim(models_dir, [path.name])  # a file of train.py's in a folder shared with you
    old = Path(str(previous.get("path", "")))
    # the previous best model goes only while it is provably this run's: recorded by this checkpoint folder (not a
    # copy of another's), in this --models_dir, and still the bytes train.py claimed writing there
    if previous.get("path") and previous.get("checkpoint_dir") == str(ckpt_dir.resolve()) and old.is_file() and \
            old.resolve() != path.resolve() and old.resolve().parent == models_dir.resolve():
        remove_claimed(models_dir, [old.name])
    save_json(ckpt_dir / SELECTED, {**model_record(path, ckpt), "sha256": file_sha256(path), "selected_on": selection,
                                    "accuracy": m["accuracy"], "loss": m["loss"],
                                    "checkpoint_dir": str(ckpt_dir.resolve())})
    with atomic_path(models_dir / "best_model.txt") as tmp:
        tmp.write_text(str(path) + "\n")
    return {"acc": m["accuracy"], "loss": m["loss"], "path": str(path)}


def train(args) -> dict:
    """The run in steps: its folder claimed, the data, how it starts, the model, the loaders, its settings recorded,
    then the epochs (each saving its checkpoint, dynamics, last.pth and, when it is the best so far, the selected model)."""
    d = Dist(args.device)
    device = d.device
    ckpt = None
    if d.main:  # checked before any work: a folder we cannot write, or not train.py's, fails now, not after an epoch
        ensure_output_dir(args.checkpoint_dir, "--checkpoint_dir", OWNER.name)
        ensure_output_dir(args.models_dir, "--models_dir")
        ckpt = OWNER.folder(args.checkpoint_dir, "--checkpoint_dir")
    ckpt_dir = Path(args.checkpoint_dir)
    train_run = uuid.uuid4().hex[:16]  # this training run's identity: in train_args.json, every checkpoint, the dynamics
    if args.resume:
        train_run = resume_settings(args, ckpt_dir)
    set_seed(args.seed + d.rank)
    data = training_data(args, d.main)
    train_list, test_list, select_list, selection = data.train_list, data.test_list, data.select_list, data.selection
    class_names, excluded, kept = data.class_names, data.excluded, data.kept
    state = starting_point(args, decide_start(args.resume, args.fork_from, args.overwrite, ckpt_dir), ckpt_dir, data, ckpt,
                           d.main)
    start_epoch, lr_history, best, resume, fork, forked = (state.start_epoch, state.lr_history, state.best, state.resume,
                                                           state.fork, state.forked)
    model = build_model(args.arch, len(class_names), None if resume or fork else resolve_weights(args.arch, args.weights))
    if resume or fork:
        model.load_state_dict((resume or fork)["model_state"])
    model = model_to_device(model, device)
    module = model
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    if resume:
        optimizer.load_state_dict(resume["optimizer_state"])

    train_ds = ImageListDataset(train_list, build_transform(args.image_size, train=True, hflip=args.hflip), indices=kept)
    previous = load_dynamics(ckpt_dir, len(train_list.paths), class_names) if resume else (fork["dynamics"] if fork else None)
    dynamics = DynamicsRecorder(len(train_list.paths), args.epochs, class_names, args.data_dir, previous, start_epoch,
                                train_run=train_run)
    sampler = None
    if d.world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_ds, d.world, d.rank, shuffle=True, seed=args.seed)
    # drop the ragged last batch: a batch of one breaks batch norm in training mode
    per_rank = len(train_ds) // d.world
    train_loader = make_loader(train_ds, args.batch_size, True, args.num_workers, str(device), sampler=sampler,
                               seed=args.seed + start_epoch, drop_last=per_rank > args.batch_size)
    # Each rank evaluates a strided share of the selection split (val, else test); predictions are gathered.
    select_ds = ImageListDataset(select_list, build_transform(args.image_size, train=False),
                                 indices=np.arange(len(select_list.paths))[d.rank::d.world])
    select_loader = make_loader(select_ds, max(64, args.batch_size), False, args.num_workers, str(device))

    if d.main:
        ckpt.fill()
        # The exclusions themselves (index and file), so that every retrain of this run leaves out the same images.
        save_json(ckpt_dir / "train_args.json", {**{k: v for k, v in vars(args).items() if k != "given"}, "git_commit": git_commit(), "world_size": d.world,
                                                 "n_train": len(train_list.paths), "n_test": len(test_list.paths),
                                                 "selection_split": selection, "n_selection": len(select_list.paths),
                                                 "n_excluded": int(len(excluded)), "train_run": train_run,
                                                 "data_train_key": listing_key(train_list), "forked": forked,
                                                 "excluded": {"train_idx": excluded.tolist(),
                                                              "path": [train_list.paths[i] for i in excluded]}})
        log.info(f"training {args.arch} on {len(kept)} train" + (f" ({len(excluded)} excluded)" if len(excluded) else "")
                 + f" / selecting on {len(select_list.paths)} {selection} images, "
                 f"{len(class_names)} classes, {args.image_size}px, device {device}, world size {d.world}, epochs {start_epoch}..{args.epochs}")
    from tqdm import tqdm

    last_metrics = {}

    def step(x, y):
        with autocast(device):
            out = model(x)
            return out, F.cross_entropy(out.float(), y)

    def batches(epoch):
        if sampler is not None:
            sampler.set_epoch(epoch)
        # Every epoch's randomness (shuffle order, worker seeds, augmentation) depends only on
        # (seed, epoch, rank), so an epoch redone after --resume is the very same epoch.
        epoch_seed = int(np.random.SeedSequence([args.seed, epoch, d.rank]).generate_state(1)[0])
        set_seed(epoch_seed)
        train_loader.generator.manual_seed(epoch_seed)
        model.train()
        for x, y, idx in tqdm(train_loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=True if not d.main else None):
            yield batch_to_device(x, device), y.to(device, non_blocking=True), idx

    def on_batch(idx, out, y, loss):
        dynamics.record(idx, out, y)

    def on_epoch(epoch, lr, stats):
        nonlocal last_metrics, best, epoch_start
        loss_sum, correct, seen = d.sum([stats.loss_sum, stats.correct, stats.seen])
        dynamics.end_epoch(epoch, reduce=d.sum_array if d.world > 1 else None)
        if not math.isfinite(loss_sum):
            raise UserError(f"training diverged at epoch {epoch} (loss is {loss_sum}); lower --learning_rate")
        preds = d.gather_eval(predict(module, select_loader, device))
        m = metrics_from_logits(preds["logits"], preds["labels"], len(class_names))
        lr_history.append(lr)
        last_metrics = {"train_loss": loss_sum / seen, "train_acc": correct / seen, "val_loss": m["loss"], "val_acc": m["accuracy"]}
        if d.main:
            log.info(f"epoch {epoch}/{args.epochs} | lr {lr:.2e} | train_loss {last_metrics['train_loss']:.4f} "
                     f"train_acc {last_metrics['train_acc']:.4f} | val_loss {m['loss']:.4f} val_acc {m['accuracy']:.4f} "
                     + ("(on test) " if selection == "test" else "") + f"| {time.time() - epoch_start:.1f}s")
            best = save_epoch(epoch, lr, m, last_metrics, best)
        epoch_start = time.time()

    def save_epoch(epoch, lr, m, metrics, best):
        common = dict(arch=args.arch, class_names=class_names, image_size=args.image_size, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, epoch=epoch, metrics=metrics)
        # val_* metrics are of the selection split; split_key: which images were train/val/test (evaluate.py checks it)
        run_tag = {"train_run": train_run, "selection_split": selection, "split_key": split_key(args.data_dir)}
        is_ckpt = epoch % args.save_checkpoints_every == 0 or epoch == args.epochs
        # lr_t for TracIn: the mean rate over the epochs since the previous checkpoint.
        prev = max([forked["epoch"] if forked else 0] + [int(p.stem.split("_")[-1]) for p in find_checkpoints(ckpt_dir) if int(p.stem.split("_")[-1]) < epoch])
        lr_t = float(np.mean(lr_history[prev:epoch]))
        if is_ckpt:
            save_checkpoint(make_checkpoint(module, lr=lr_t, **common, metadata=run_tag), ckpt_dir / f"finetune_epoch_{epoch}.pth")
        if (m["accuracy"], -m["loss"]) > (best["acc"], -best["loss"]):
            best = save_selected(args, module, ckpt_dir, selection, epoch, lr_t, m, common, run_tag)
        dynamics.save(ckpt_dir, epoch)  # before last.pth: a resume never lacks an epoch's dynamics
        save_checkpoint(make_checkpoint(module, lr=lr, optimizer=optimizer, **common,
                                        metadata={"lr_history": lr_history, "best": best, **run_tag}), ckpt_dir / "last.pth")
        return best

    epoch_start = time.time()
    fit(step, optimizer, batches, args.epochs, lambda epoch: lr_at(epoch, args), start_epoch=start_epoch,
        on_batch=on_batch, on_epoch=on_epoch)
    if d.main:
        log.info(f"done: best val_acc {best['acc']:.4f} (on {selection}) -> {best['path']}; checkpoints: "
                 f"{', '.join(p.name for p in find_checkpoints(ckpt_dir))} in {ckpt_dir}")
    d.close()
    return {"best": best, "last": last_metrics}


def main(argv=None):
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    cli(main)
