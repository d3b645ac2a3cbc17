"""Running a model over a split: every script's inference loop, its metrics and its per-image table.

    preds = predict(model, loader, device)          # logits, labels, indices of every image
    metrics_from_logits(preds["logits"], preds["labels"], num_classes)
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lib.checkpoints import load_checkpoint, model_from_checkpoint
from lib.data_utils import ImageListDataset, check_same_split, eval_transform, list_split, make_loader
from lib.devices import autocast, batch_to_device, model_to_device
from lib.training import example_figures


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
