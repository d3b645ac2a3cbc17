"""Model building and checkpoint I/O: the only place that knows how a model is made and saved.

    from model_architecture import build_model, save_checkpoint, load_checkpoint
    model = build_model("resnet50", num_classes=10, weights="models/pretrained/resnet50-11ad3fa6.pth")

It also runs models: `model_to_device`, `predict` (every script's inference loop),
`metrics_from_logits` and `evaluate_model`.

A checkpoint is a self-describing dict (see `make_checkpoint`), loaded with
`torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common import UserError, atomic_path, autocast, first_line
from data_utils import ImageListDataset, check_same_split, eval_transform, list_split, make_loader
from training import example_figures

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
PRETRAINED_DIR = Path("models/pretrained")
# torchvision's published ImageNet weights for the archs above (IMAGENET1K_V2 for resnet50).
PRETRAINED_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "resnet101": "resnet101-cd907fc2.pth",
}
CHECKPOINT_RE = re.compile(r"finetune_epoch_(\d+)\.pth$")


def build_model(arch: str = "resnet50", num_classes: int = 10, weights: str | None = None) -> nn.Module:
    """A torchvision ResNet with a new `fc` head of `num_classes` outputs.

    Args:
        arch: one of ARCHS.
        num_classes: outputs of the new head.
        weights: None (random init) or the path of an ImageNet state_dict for `arch`;
            every layer but the head is loaded from it.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model = getattr(torchvision.models, arch)(weights=None)
    if weights is not None:
        state = load_state_file(weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError:
            raise UserError(f"{weights} does not hold {arch} weights (tensor shapes differ)") from None
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise UserError(f"{weights} does not hold {arch} weights (missing {len(missing)}, unexpected {len(unexpected)} keys)")
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def load_state_file(path: str | os.PathLike) -> dict:
    """torch.load a file holding a state_dict (or a checkpoint dict), weights only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist") from None
    except Exception as e:  # pickle errors, zip errors, truncated files
        raise UserError(f"cannot load {path} as a torch file: {first_line(e)}") from None
    if isinstance(obj, dict) and "model_state" in obj:
        obj = obj["model_state"]
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state_dict")
    return obj


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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:
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


# ---------------------------------------------------------------- running a model
def model_to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to `device`; channels_last on CUDA (the one place that decides it)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def batch_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, desc: str | None = None) -> dict:
    """Run `model` over a loader of (image, label, index) batches.

    Returns: dict of numpy arrays logits (n, C) float32, labels (n,), indices (n,).
    """
    from tqdm import tqdm

    model.eval()
    logits, labels, indices = [], [], []
    for x, y, idx in tqdm(loader, desc=desc, disable=True if desc is None else None, leave=False):
        x = batch_to_device(x, device)
        with autocast(device):
            out = model(x)
        logits.append(out.float().cpu())
        labels.append(y)
        indices.append(idx)
    return {
        "logits": torch.cat(logits).numpy(),
        "labels": torch.cat(labels).numpy(),
        "indices": torch.cat(indices).numpy(),
    }


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """accuracy, mean loss, per-class accuracy and the confusion matrix (rows: true)."""
    logits_t, labels_t = torch.from_numpy(np.asarray(logits, dtype=np.float32)), torch.from_numpy(np.asarray(labels))
    loss = F.cross_entropy(logits_t, labels_t).item() if len(labels) else float("nan")
    pred = logits_t.argmax(1).numpy()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = np.divide(np.diag(confusion), confusion.sum(1), out=np.full(num_classes, np.nan), where=confusion.sum(1) > 0)
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "loss": float(loss),
        "per_class_accuracy": per_class,
        "confusion": confusion,
        "pred": pred,
    }


def evaluate_model(model_path, data_dir: str, split: str, batch_size: int, num_workers: int, device: torch.device):
    """Load a checkpoint, predict a split, return (listing, ckpt, predictions, metrics)."""
    listing = list_split(data_dir, split)
    ckpt = load_checkpoint(model_path, class_names=listing.class_names)
    check_same_split(ckpt, data_dir, model_path)
    model = model_to_device(model_from_checkpoint(ckpt), device)
    tf = eval_transform(ckpt)
    loader = make_loader(ImageListDataset(listing, tf), batch_size, False, num_workers, str(device))
    preds = predict(model, loader, device, desc=f"predict {split}")
    return listing, ckpt, preds, metrics_from_logits(preds["logits"], preds["labels"], len(listing.class_names))


def predictions_frame(listing, preds: dict, split: str) -> pd.DataFrame:
    probs = torch.softmax(torch.from_numpy(preds["logits"]), 1).numpy()
    pred = probs.argmax(1)
    names = np.asarray(listing.class_names)
    idx = preds["indices"]
    return pd.DataFrame({
        "split": split,
        "index": idx,
        "path": [listing.paths[i] for i in idx],
        "true_label": names[preds["labels"]],
        "pred_label": names[pred],
        "correct": pred == preds["labels"],
        "confidence": probs.max(1),
        "true_class_prob": probs[np.arange(len(pred)), preds["labels"]],
    })


def logit_figures(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example cross-entropy, logit margin (given-label logit minus the largest other logit;
    Pleiss et al. 2020) and EL2N error norm |softmax - onehot| (Paul et al. 2021) from logits
    (..., n, C) and labels (n,)."""
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    figures = example_figures(z, torch.from_numpy(np.asarray(labels, dtype=np.int64)))
    return tuple(v.numpy().astype(np.float32) for v in figures)
