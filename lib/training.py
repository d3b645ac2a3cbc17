"""Training as a library: the one optimisation loop every trainer uses, and per-example figures from logits.

    from lib.training import example_figures, fit
    fit(step, optimizer, batches, epochs=4, lr_at=lambda e: 1e-3, on_epoch=report)

`fit` is used by train.py (the ResNet, under DDP, with training dynamics and checkpoints in its callbacks) and by
TracIn/experiments/retraining.py's fc-only retrainer (float64 on cached features), so every removal experiment and the LDS
retrain with the very loop that trained the original model. What differs between them is in the arguments:
`step(x, y)` gives the logits and loss of one batch, `batches(epoch)` gives an epoch's batches (and does that epoch's
seeding), and the callbacks record what a trainer keeps. `Dist` is train.py's torchrun awareness (rank, world size,
reductions; a no-op in one process). Training depends on nothing in TracIn/.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from lib.devices import resolve_device


@dataclass
class EpochStats:
    """One epoch's running totals over the batches this process saw."""
    loss_sum: float = 0.0   # sum over examples of the batch-mean loss times the batch size
    correct: float = 0.0
    seen: float = 0.0

# The settings that make two training runs comparable: a fork continues a run of these, an ensemble's members share them.
SAME_SETTINGS = ("learning_rate", "lr_schedule", "batch_size", "weight_decay", "epochs", "image_size", "hflip")


def fit(step: Callable, optimizer: torch.optim.Optimizer, batches: Callable[[int], Iterable], epochs: int,
        lr_at: Callable[[int], float], start_epoch: int = 1, on_batch: Callable | None = None,
        on_epoch: Callable | None = None) -> None:
    """Epochs start_epoch..epochs of minibatch training.

    Args:
        step: (x, y) -> (logits (b, C), loss), the forward pass and the scalar loss of one batch.
        optimizer: its learning rate is set to lr_at(epoch) at the start of each epoch.
        batches: epoch -> iterable of (x, y, idx); called after the rate is set, so it may seed the epoch.
        on_batch: (idx, logits, y, loss) after each optimiser step (training dynamics, fault injection).
        on_epoch: (epoch, lr, EpochStats) after each epoch (evaluation, checkpoints, logging).
    """
    for epoch in range(start_epoch, epochs + 1):
        lr = lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = EpochStats()
        for x, y, idx in batches(epoch):
            logits, loss = step(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_batch is not None:
                on_batch(idx, logits, y, loss)
            if on_epoch is not None:  # only a caller that reads the totals pays for the .item() sync
                stats.loss_sum += loss.item() * len(y)
                stats.correct += (logits.argmax(1) == y).sum().item()
                stats.seen += len(y)
        if on_epoch is not None:
            on_epoch(epoch, lr, stats)


def example_figures(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy, logit margin (given-label logit minus the largest other; Pleiss et al. 2020) and
    EL2N error norm |softmax - onehot| (Paul et al. 2021), in the logits' dtype.

    Args:
        logits: (..., n, C); labels: (n,) class indices, broadcast over the leading dimensions.
    Returns:
        loss, margin, el2n, each (..., n).
    """
    y = labels.to(torch.int64).expand(logits.shape[:-1])
    given = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    loss = torch.logsumexp(logits, -1) - given
    other = logits.scatter(-1, y.unsqueeze(-1), -float("inf")).amax(-1)
    el2n = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)).norm(dim=-1)
    return loss, given - other, el2n


class Dist:
    """torchrun awareness: rank, world size, reductions; a no-op in a single process."""

    def __init__(self, device_name: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1:
            use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
            dist.init_process_group("nccl" if use_cuda else "gloo")
            self.device = torch.device(f"cuda:{self.local_rank}") if use_cuda else torch.device("cpu")
            if use_cuda:
                torch.cuda.set_device(self.device)
        else:
            self.device = resolve_device(device_name)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_array(self, values: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(self.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    def gather_eval(self, preds: dict) -> dict:
        """All ranks' predictions, concatenated (rank 0 needs them for metrics)."""
        if self.world == 1:
            return preds
        per_rank = [None] * self.world
        dist.all_gather_object(per_rank, preds)
        return {k: np.concatenate([p[k] for p in per_rank]) for k in preds}

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def scheduled_lr(epoch: int, schedule: str, peak: float, epochs: int) -> float:
    """train.py's learning rate during 1-based `epoch`: constant, or cosine from `peak` over `epochs`."""
    import math

    if schedule == "constant":
        return peak
    return 0.5 * peak * (1 + math.cos(math.pi * (epoch - 1) / epochs))
