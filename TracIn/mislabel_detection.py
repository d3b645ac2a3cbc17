"""Rank training images by TracIn self-influence to find likely mislabeled ones.

    $ python -m TracIn.mislabel_detection --results_dir TracIn/results --data_dir data/processed

Self-influence sum_t lr_t |grad L(z; theta_t)|^2 is large for examples the model keeps
having to push towards their (possibly wrong) label (Pruthi et al. 2020, section 5).
Writes results_dir/mislabel_candidates.csv (rank, train_idx, path, given class, predicted
class, self-influence, loss). Where data_dir/mislabeled_ground_truth.csv exists (the demo's
injected label noise) it also reports recall at 5/10/20% of the training set inspected and
ROC AUC beside a loss baseline (rank by training loss at the last checkpoint), in
mislabel_detection.json and mislabel_detection.png.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common import cli, save_csv, save_figure, save_json
from data_utils import list_split
from TracIn.results import load_results

log = logging.getLogger(__name__)
FRACTIONS = (0.05, 0.10, 0.20)


def recall_at(scores: np.ndarray, is_bad: np.ndarray, fraction: float) -> float:
    """Share of the bad examples among the top `fraction` of examples by score."""
    k = int(round(fraction * len(scores)))
    top = np.argsort(-scores, kind="stable")[:k]
    return float(is_bad[top].sum() / max(is_bad.sum(), 1))


def roc_auc(scores: np.ndarray, is_bad: np.ndarray) -> float:
    """Probability that a random bad example outscores a random good one (ties count half)."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    n_pos, n_neg = int(is_bad.sum()), int((~is_bad).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[is_bad].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detect(results_dir: str, data_dir: str, out_dir: str | None = None) -> dict:
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir else results_dir
    r = load_results(results_dir, data_dir=data_dir, need=("self_influence", "train_loss_last", "train_pred_last"))
    self_inf, train_ids, loss, pred = (np.asarray(r[n]) for n in ("self_influence", "train_indices", "train_loss_last", "train_pred_last"))
    listing = list_split(data_dir, "train")
    names = np.asarray(listing.class_names)
    order = np.argsort(-self_inf, kind="stable")
    table = pd.DataFrame({
        "rank": np.arange(1, len(order) + 1),
        "train_idx": train_ids[order],
        "path": np.asarray(listing.paths)[train_ids[order]],
        "given_class": names[listing.labels[train_ids[order]]],
        "predicted_class": names[pred[order]],
        "self_influence": self_inf[order],
        "loss": loss[order],
    })
    gt_path = Path(data_dir) / "mislabeled_ground_truth.csv"
    report = {"n_train": int(len(train_ids))}
    if gt_path.exists():
        gt = pd.read_csv(gt_path)
        is_bad = np.isin(train_ids, gt.train_index.to_numpy())
        table["truly_mislabeled"] = is_bad[order]
        report["n_mislabeled"] = int(is_bad.sum())
        for name, scores in (("self_influence", self_inf), ("loss", loss)):
            report[name] = {f"recall_at_{int(f * 100)}pct": recall_at(scores, is_bad, f) for f in FRACTIONS}
            report[name]["roc_auc"] = roc_auc(scores, is_bad)
        save_figure(out / "mislabel_detection.png", plot_curves({"TracIn self-influence": self_inf, "training loss (last checkpoint)": loss}, is_bad))
        save_json(out / "mislabel_detection.json", report)
    save_csv(out / "mislabel_candidates.csv", table)
    return report


def plot_curves(rankings: dict, is_bad: np.ndarray):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    x = np.arange(1, len(is_bad) + 1) / len(is_bad)
    for label, scores in rankings.items():
        found = np.cumsum(is_bad[np.argsort(-scores, kind="stable")]) / max(is_bad.sum(), 1)
        ax.plot(x, found, label=f"{label} (AUC {roc_auc(scores, is_bad):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
    ax.axvline(is_bad.mean(), color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of mislabeled images found")
    ax.set_title(f"Finding {int(is_bad.sum())} injected label errors")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="TracIn/results", help="efficient_tracin.py output (default TracIn/results)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--out_dir", default=None, help="where to write (default: --results_dir)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    r = detect(args.results_dir, args.data_dir, args.out_dir)
    out = args.out_dir or args.results_dir
    if "self_influence" in r:
        for name in ("self_influence", "loss"):
            m = r[name]
            log.info(f"mislabel detection by {name:<14}: recall@5% {m['recall_at_5pct']:.3f}  recall@10% {m['recall_at_10pct']:.3f}  "
                     f"recall@20% {m['recall_at_20pct']:.3f}  ROC AUC {m['roc_auc']:.3f}  ({r['n_mislabeled']} injected errors)")
    log.info(f"mislabel candidates: {out}/mislabel_candidates.csv")
    return 0


if __name__ == "__main__":
    cli(main)
