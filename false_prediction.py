"""Mispredicted images of the best model on train and test, as a CSV and a captioned grid.

    $ python false_prediction.py                      # best model in models/
    $ python false_prediction.py --model models/checkpoints/finetune_epoch_4.pth --max_images 48

Writes false_predictions/false_predictions.csv (split, index, path, true_label, pred_label,
confidence, true_class_prob) and false_predictions/combined_mispredictions.png
(true -> predicted under each image). On the training split, "true" is the given label,
which may itself be wrong: that is what the mislabel analysis looks for.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from lib.checkpoints import find_best_model, model_record
from lib.cli import cli, nonneg_int, positive_int
from lib.data_utils import data_identity, load_rgb
from lib.devices import resolve_device
from lib.files import file_sha256, save_csv, save_figure, save_json
from lib.outputs import FalsePredictions, load_false_predictions as load  # noqa: F401  (this tool's reader)
from lib.ownership import Owner
from lib.prediction import evaluate_model, predictions_frame

log = logging.getLogger(__name__)
OWNER = Owner("false_prediction")
COLUMNS = ["split", "index", "path", "true_label", "pred_label", "confidence", "true_class_prob"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the best model in --models_dir)")
    p.add_argument("--models_dir", default="models", help="where train.py put the best model (default models)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--out_dir", default="false_predictions", help="output folder (default false_predictions)")
    p.add_argument("--max_images", type=positive_int, default=40, help="images in the grid, half from each split (default 40)")
    p.add_argument("--batch_size", type=positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="loader workers (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    return p.parse_args(argv)


def plot_grid(rows: pd.DataFrame, title: str, cols: int = 8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(rows), 1)
    r = -(-n // cols)
    fig, axes = plt.subplots(r, cols, figsize=(cols * 1.6, r * 1.9 + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (_, row) in zip(axes.ravel(), rows.iterrows()):
        ax.imshow(load_rgb(row.path))
        ax.set_title(f"{row.split} #{row['index']}\n{row.true_label} -> {row.pred_label}\n({row.confidence:.2f})", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    model_path = args.model or find_best_model(args.models_dir)
    frames, lines = [], []
    for split in ("test", "train"):
        listing, ckpt, preds, m = evaluate_model(model_path, args.data_dir, split, args.batch_size, args.num_workers, device)
        f = predictions_frame(listing, preds, split)
        wrong = f[~f.correct]
        frames.append(wrong[COLUMNS])
        lines.append(f"{split}: {len(wrong)} of {len(f)} mispredicted (error rate {len(wrong) / len(f):.2%})")
    table = pd.concat(frames, ignore_index=True)
    out = Path(args.out_dir)
    save_csv(out / "false_predictions.csv", table)
    # what the table came from, compared by every reader (Grad-CAM, the misprediction analysis, the report)
    save_json(out / "false_predictions.json", {"model": model_record(model_path, ckpt), "model_sha256": file_sha256(model_path),
                                               **data_identity(args.data_dir), "train_run": ckpt.get("train_run"),
                                               "csv_sha256": file_sha256(out / "false_predictions.csv")})  # the table itself
    # the most confident mistakes, half from each split (test first), the rest filled from either
    ranked = table.sort_values("confidence", ascending=False)
    half = args.max_images // 2
    picks = pd.concat([ranked[ranked.split == "test"].head(args.max_images - half), ranked[ranked.split == "train"].head(half)])
    picks = pd.concat([picks, ranked.drop(picks.index)]).head(args.max_images)
    shown = picks.sort_values(["split", "confidence"], ascending=[True, False])
    save_figure(out / "combined_mispredictions.png",
                plot_grid(shown, f"Mispredictions of {Path(model_path).name} (true -> predicted, confidence); {len(shown)} of {len(table)}"))
    OWNER.claim(out, ["false_predictions.csv", "false_predictions.json", "combined_mispredictions.png"])
    log.info(f"model: {model_path} (epoch {ckpt['epoch']})")
    for line in lines:
        log.info(line)
    log.info(f"outputs: {out}/false_predictions.csv, {out}/combined_mispredictions.png")
    return 0


if __name__ == "__main__":
    cli(main)
