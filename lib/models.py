"""The models: which torchvision architectures a run may use and how one is built (from scratch or a weights file).

    from lib.models import build_model          # or the seed's path: from model_architecture import build_model
    model = build_model("resnet50", num_classes=10, weights="models/pretrained/resnet50-11ad3fa6.pth")

Saving and loading checkpoints is lib/checkpoints.py; running a model over a split, lib/prediction.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from lib.cli import UserError, first_line


ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


PRETRAINED_DIR = Path("models/pretrained")


# torchvision's published ImageNet weights for the archs above (IMAGENET1K_V2 for resnet50).
PRETRAINED_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "resnet101": "resnet101-cd907fc2.pth",
}


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
