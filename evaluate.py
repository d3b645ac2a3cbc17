"""Evaluation: predictions, accuracy, per-class accuracy and the confusion matrix.

    $ python evaluate.py                                   # best model in models/, test split
    $ python evaluate.py --model models/checkpoints/finetune_epoch_4.pth --split train

Library use: `predict()` runs a model over a loader (every other script's inference goes
through it) and `metrics_from_logits()` turns logits into the figures.

Writes to --out_dir (default models/evaluation): predictions_<split>.csv,
metrics_<split>.json, confusion_matrix_<split>.csv and confusion_matrix_<split>.png.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from common import UserError, cli, nonneg_int, positive_int, save_csv, save_figure, save_json
from data_utils import ImageListDataset, build_transform, list_split, make_loader
from model_architecture import find_best_model, load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available here")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, desc: str | None = None) -> dict:
    """Run `model` over a loader of (image, label, index) batches.

    Returns: dict of numpy arrays logits (n, C) float32, labels (n,), indices (n,).
    """
    from tqdm import tqdm

    model.eval()
    logits, labels, indices = [], [], []
    for x, y, idx in tqdm(loader, desc=desc, disable=True if desc is None else None, leave=False):
        x = x.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
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


def plot_confusion(confusion: np.ndarray, class_names: list[str], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.65 * n, 0.8 + 0.55 * n))
    sns.heatmap(confusion, annot=True, fmt="d", cmap="Blues", xticklabels=class_names, yticklabels=class_names, cbar=False, ax=ax)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    return fig


def evaluate_model(model_path, data_dir: str, split: str, batch_size: int, num_workers: int, device: torch.device):
    """Load a checkpoint, predict a split, return (listing, ckpt, predictions, metrics)."""
    listing = list_split(data_dir, split)
    ckpt = load_checkpoint(model_path, class_names=listing.class_names)
    model = model_from_checkpoint(ckpt).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    tf = build_transform(ckpt["image_size"], train=False, mean=ckpt["mean"], std=ckpt["std"])
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint to evaluate (default: the best model in --models_dir)")
    p.add_argument("--models_dir", default="models", help="where train.py put the best model (default models)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--split", choices=("train", "test"), default="test", help="split to evaluate (default test)")
    p.add_argument("--out_dir", default="models/evaluation", help="output folder (default models/evaluation)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="loader workers (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model_path = args.model or find_best_model(args.models_dir)
    listing, ckpt, preds, m = evaluate_model(model_path, args.data_dir, args.split, args.batch_size, args.num_workers, resolve_device(args.device))
    out = Path(args.out_dir)
    names = listing.class_names
    save_csv(out / f"predictions_{args.split}.csv", predictions_frame(listing, preds, args.split))
    save_csv(out / f"confusion_matrix_{args.split}.csv", pd.DataFrame(m["confusion"], index=names, columns=names).rename_axis("true").reset_index())
    save_figure(out / f"confusion_matrix_{args.split}.png", plot_confusion(m["confusion"], names, f"{Path(model_path).name} ({args.split})"))
    save_json(out / f"metrics_{args.split}.json", {
        "model": str(model_path), "split": args.split, "n": len(preds["labels"]),
        "accuracy": m["accuracy"], "loss": m["loss"],
        "per_class_accuracy": dict(zip(names, map(float, m["per_class_accuracy"]))),
    })
    worst = sorted(zip(m["per_class_accuracy"], names))[:3]
    log.info(f"eval {args.split}: n={len(preds['labels'])} accuracy={m['accuracy']:.4f} loss={m['loss']:.4f} "
             f"| weakest classes: {', '.join(f'{n} {a:.3f}' for a, n in worst)} | outputs in {out}")
    return 0


if __name__ == "__main__":
    cli(main)
