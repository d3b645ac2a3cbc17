"""Where tensors run: the device a --device flag names, bf16 autocast on CUDA, seeding, moving models and batches.

    device = resolve_device("auto")        # cuda if there is one, else cpu; a bad name is one UserError
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torch.nn as nn

from lib.cli import UserError


def resolve_device(name: str = "auto"):
    """auto, cpu, cuda or cuda:N -> torch.device; anything else is a UserError naming --device."""
    import re

    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if not m or (m.group(1) == "cpu" and m.group(2)):
        raise UserError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if m.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but CUDA is not available here")
        if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_seed(seed: int) -> None:
    """The one seeding helper: Python, NumPy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to `device`; channels_last on CUDA (the one place that decides it)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def batch_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x
