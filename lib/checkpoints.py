"""Checkpoint I/O: the self-describing checkpoint dict, written atomically and loaded with weights_only=True.

    from lib.checkpoints import load_checkpoint, model_from_checkpoint, find_checkpoints
    ckpt = load_checkpoint("models/checkpoints/finetune_epoch_4.pth", class_names=names, arch="resnet50")
    model = model_from_checkpoint(ckpt)

A checkpoint is a dict (see `make_checkpoint`, nanoGPT style): the weights, the architecture, class names, image size
and normalisation, epoch, the learning rate TracIn weights it by, metrics, and the training run's identity.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from lib.cli import UserError, first_line
from lib.files import atomic_path
from lib.models import build_model


CHECKPOINT_RE = re.compile(r"finetune_epoch_(\d+)\.pth$")


def make_checkpoint(model: nn.Module, *, arch: str, class_names: list[str], image_size: int, mean, std,
                    epoch: int, lr: float, metrics: dict, optimizer=None, scheduler=None, metadata: dict | None = None) -> dict:
    """The self-describing checkpoint dict (nanoGPT style)."""
    module = model.module if hasattr(model, "module") else model
    ckpt = {
        "model_state": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "arch": arch,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "image_size": int(image_size),
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "epoch": int(epoch),
        # the mean learning rate in force during the epochs since the previous checkpoint
        "lr": float(lr),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    if optimizer is not None:
        ckpt["optimizer_state"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler_state"] = scheduler.state_dict()
    if metadata:
        ckpt.update(metadata)
    return ckpt


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary name, renamed on success; a full disk is an OSError(ENOSPC)."""
    import errno
    import shutil

    try:
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
    except RuntimeError as e:  # torch's zip writer reports a failed write as a RuntimeError
        size = sum(v.numel() * v.element_size() for v in ckpt["model_state"].values())
        if shutil.disk_usage(Path(path).parent).free < size:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        raise UserError(f"cannot write checkpoint {path}: {first_line(e)}") from None


REQUIRED_KEYS = ("model_state", "arch", "num_classes", "class_names", "image_size", "mean", "std", "epoch", "lr")


def load_checkpoint(path: str | os.PathLike, class_names: list[str] | None = None, arch: str | None = None) -> dict:
    """Load and validate a checkpoint; optionally check it matches a class set / arch."""
    import pickle
    import zipfile

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        # torch's own message for a file it cannot unpickle advises weights_only=False (running the file's code);
        # train.py writes a zip archive of tensors and plain values, so anything else is simply not one of its files
        if isinstance(e, (pickle.UnpicklingError, EOFError)) or (Path(path).is_file() and not zipfile.is_zipfile(path)):
            raise UserError(f"cannot load checkpoint {path}: it is not a checkpoint written by train.py (not a PyTorch "
                            "file of tensors and plain values)") from None
        raise UserError(f"cannot load checkpoint {path}: {first_line(e)}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise UserError(f"{path} is not a checkpoint written by train.py (missing keys); a bare state_dict belongs in --weights")
    if arch is not None and ckpt["arch"] != arch:
        raise UserError(f"{path} is a {ckpt['arch']} checkpoint, expected {arch}")
    if class_names is not None and list(ckpt["class_names"]) != list(class_names):
        raise UserError(
            f"{path} was trained on classes {ckpt['class_names']} but the data has {list(class_names)}"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """The checkpoint's model in eval mode. Built on the meta device and filled by assignment,
    so no time goes into a random initialisation that the checkpoint overwrites anyway."""
    with torch.device("meta"):
        model = build_model(ckpt["arch"], ckpt["num_classes"])
    try:
        model.load_state_dict(ckpt["model_state"], assign=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit a {ckpt['arch']}: {first_line(e)}") from None
    return model.eval()


def weights_sha256(ckpt: dict) -> str:
    """The identity of a checkpoint's model: sha256 over its weights (names, dtypes, shapes, bytes). Two files of the
    same model (a checkpoint and the best-model file of the same epoch) share it, whatever else they record."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(ckpt["model_state"]):
        t = ckpt["model_state"][name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_record(path, ckpt: dict) -> dict:
    """What names a model in every output that describes one (run.json, false_predictions.json, metrics_*.json)."""
    return {"path": str(path), "weights_sha256": weights_sha256(ckpt), "epoch": int(ckpt["epoch"]),
            "train_run": ckpt.get("train_run")}


def model_difference(ours: dict | None, theirs: dict | None) -> str | None:
    """Why two outputs' model records (model_record) do not describe the same model (their weights); None if they do."""
    a = ours.get("weights_sha256") if isinstance(ours, dict) else None
    b = theirs.get("weights_sha256") if isinstance(theirs, dict) else None
    if not a or not b:
        return "one side does not record which model it describes (written by an older version)"
    if a != b:
        describe = lambda r: f"the model of epoch {r.get('epoch')} ({Path(str(r.get('path'))).name})"
        return f"{describe(ours)} and {describe(theirs)} are different models"
    return None


def check_same_model(ours: dict | None, theirs: dict | None, what: str, fix: str) -> None:
    """Refuse to join two outputs that describe different models, naming both and the fix."""
    why = model_difference(ours, theirs)
    if why:
        raise UserError(f"{what}: {why}; {fix}")


SELECTED = "selected_model.json"  # train.py's record, in the checkpoint folder, of the model it selected


def find_checkpoints(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Every finetune_epoch_N.pth in a folder, ordered by epoch."""
    found = []
    for p in Path(checkpoint_dir).glob("finetune_epoch_*.pth"):
        m = CHECKPOINT_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def best_model_name(arch: str, dataset_tag: str, acc: float, loss: float) -> str:
    """e.g. Resnet50_animals10_val_0_9785_0_6127.pth"""
    fmt = lambda x: f"{x:.4f}".replace(".", "_").replace("-", "m")
    return f"{arch.capitalize()}_{dataset_tag}_val_{fmt(acc)}_{fmt(loss)}.pth"


def find_best_model(models_dir: str | os.PathLike = "models") -> Path:
    """The best model train.py recorded last (models/best_model.txt), else the highest val acc file."""
    models_dir = Path(models_dir)
    pointer = models_dir / "best_model.txt"
    if pointer.exists():
        p = Path(pointer.read_text().strip())
        if p.exists():
            return p
    files = glob.glob(str(models_dir / "*_val_*_*.pth"))
    if not files:
        raise UserError(f"no best model (*_val_*.pth) in {models_dir}; train first or pass --model PATH")
    def acc(f):
        m = re.search(r"_val_(\d+)_(\d+)_", Path(f).name)
        return float(f"{m.group(1)}.{m.group(2)}") if m else -1.0

    return Path(max(files, key=acc))
