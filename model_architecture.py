"""Model building and checkpoint I/O: the only place that knows how a model is made and saved.

    from model_architecture import build_model, save_checkpoint, load_checkpoint
    model = build_model("resnet50", num_classes=10, weights="models/pretrained/resnet50-11ad3fa6.pth")

A checkpoint is a self-describing dict (see `make_checkpoint`), loaded with
`torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from common import UserError, atomic_path

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
        raise UserError(f"cannot load {path} as a torch file: {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict) and "model_state" in obj:
        obj = obj["model_state"]
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state_dict")
    return obj


def make_checkpoint(model: nn.Module, *, arch: str, class_names: list[str], image_size: int, mean, std,
                    epoch: int, lr: float, metrics: dict, optimizer=None, scheduler=None, extra: dict | None = None) -> dict:
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
    if extra:
        ckpt.update(extra)
    return ckpt


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


REQUIRED_KEYS = ("model_state", "arch", "num_classes", "class_names", "image_size", "mean", "std", "epoch", "lr")


def load_checkpoint(path: str | os.PathLike, class_names: list[str] | None = None, arch: str | None = None) -> dict:
    """Load and validate a checkpoint; optionally check it matches a class set / arch."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise UserError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None
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
        raise UserError(f"checkpoint weights do not fit a {ckpt['arch']}: {str(e).splitlines()[0]}") from None
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
