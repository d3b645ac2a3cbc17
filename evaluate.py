"""Evaluation: predictions, accuracy, per-class accuracy and the confusion matrix.

    $ python evaluate.py                                   # best model in models/, test split
    $ python evaluate.py --model models/checkpoints/finetune_epoch_4.pth --split train

The inference loop and the metrics it prints live in lib/prediction.py (`predict`,
`metrics_from_logits`, `evaluate_model`); its reader, `load`, in lib/outputs.py; this file is only the script.

Writes to --out_dir (default models/evaluation): predictions_<split>.csv,
metrics_<split>.json, confusion_matrix_<split>.csv and confusion_matrix_<split>.png.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from lib.checkpoints import find_best_model, model_record
from lib.cli import cli, nonneg_int, positive_int
from lib.data_utils import data_identity
from lib.devices import resolve_device
from lib.files import ensure_output_dir, file_sha256, save_csv, save_figure, save_json
from lib.outputs import Evaluation, load_evaluation as load  # noqa: F401  (this tool's reader)
from lib.ownership import Owner
from lib.prediction import evaluate_model, predictions_frame

log = logging.getLogger(__name__)
OWNER = Owner("evaluate.py")


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint to evaluate (default: the best model in --models_dir)")
    p.add_argument("--models_dir", default="models", help="where train.py put the best model (default models)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="split to evaluate (default test; val is where train.py selected the model)")
    p.add_argument("--out_dir", default="models/evaluation", help="output folder (default models/evaluation)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="loader workers (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    out = ensure_output_dir(args.out_dir, "--out_dir")
    model_path = args.model or find_best_model(args.models_dir)
    listing, ckpt, preds, m = evaluate_model(model_path, args.data_dir, args.split, args.batch_size, args.num_workers, device)
    names = listing.class_names
    save_csv(out / f"predictions_{args.split}.csv", predictions_frame(listing, preds, args.split))
    save_csv(out / f"confusion_matrix_{args.split}.csv", pd.DataFrame(m["confusion"], index=names, columns=names).rename_axis("true").reset_index())
    save_figure(out / f"confusion_matrix_{args.split}.png", plot_confusion(m["confusion"], names, f"{Path(model_path).name} ({args.split})"))
    save_json(out / f"metrics_{args.split}.json", {
        "model": str(model_path), "model_sha256": file_sha256(model_path), "model_record": model_record(model_path, ckpt),
        **data_identity(args.data_dir, images=False),
        "split": args.split, "n": len(preds["labels"]),
        "accuracy": m["accuracy"], "loss": m["loss"],
        "per_class_accuracy": dict(zip(names, map(float, m["per_class_accuracy"]))),
        # where train.py chose this model (the seed chose on test; a val split keeps test untouched)
        "train_run": ckpt.get("train_run"),
        "selected_on": ckpt.get("selection_split", "test" if "val_acc" in (ckpt.get("metrics") or {}) else None),
        "selection_accuracy": (ckpt.get("metrics") or {}).get("val_acc"),
    })
    OWNER.claim(out, [f"predictions_{args.split}.csv", f"confusion_matrix_{args.split}.csv", f"confusion_matrix_{args.split}.png",
                      f"metrics_{args.split}.json"])
    worst = sorted(zip(m["per_class_accuracy"], names))[:3]
    chosen = ckpt.get("selection_split")
    if args.split == "test" and chosen == "test":
        log.warning("warning: this model was selected on the test split (data prepared without a val split), so this "
                    "test accuracy is optimistic; prepare with --val_fraction > 0 and retrain for an untouched test split")
    log.info(f"eval {args.split} of {model_path} (epoch {ckpt['epoch']}): n={len(preds['labels'])} accuracy={m['accuracy']:.4f} loss={m['loss']:.4f} "
             f"| weakest classes: {', '.join(f'{n} {a:.3f}' for a, n in worst)} | outputs in {out}")
    return 0


if __name__ == "__main__":
    cli(main)
