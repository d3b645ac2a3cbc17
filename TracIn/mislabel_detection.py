"""Rank training images by how likely their label is wrong, with several detectors side by side.

    $ python -m TracIn.mislabel_detection --results_dir TracIn/results --data_dir data/processed
    $ python -m TracIn.mislabel_detection --score self_influence      # rank by TracIn's own score

Detectors (higher = more suspicious; each defined, with its paper, in TracIn/detectors.py): self_influence,
self_influence_rank, el2n, loss_mean, loss_last, aum, forgetting, opponent_count and ensemble (the default: the mean
rank quantile of loss_last and aum, chosen by the table in docs/mislabel.md).

On the results of an ensemble of training runs (efficient_tracin --members) every detector is the members' mean:
the losses and self-influence as efficient_tracin averaged them, AUM and forgetting from each member's own
training_dynamics.npz (found beside its checkpoints; a --checkpoint_dir given there must be one of the members'),
averaged.

Writes results_dir/mislabel/ (TracIn/core/run_folder.py: built whole, with inputs.json) holding mislabel_candidates.csv
ranked by --score (column `rank`; every detector is a column; linked as results_dir/mislabel_candidates.csv) and
mislabel_detection.json. Where data_dir/mislabeled_ground_truth.csv exists (injected label noise) the json also holds
recall at 5/10/20% inspected, average precision and ROC AUC of every detector, and mislabel_detection.png plots them.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.cli import UserError, cli
from lib.data_utils import list_split
from lib.files import read_json, read_table, save_csv, save_figure, save_json
from lib.ownership import Owner
from lib.training_dynamics import dynamics_of_run
from TracIn.core.results import load_results, run_id
from TracIn.core.run_folder import tool_folder, tool_output
from TracIn.detectors import DEFAULT_SCORE, DETECTORS, FRACTIONS, average_precision, detector_scores, recall_at, roc_auc

log = logging.getLogger(__name__)
TOOL = "mislabel_detection"
CANDIDATES = "mislabel_candidates.csv"  # also linked at the run folder's root
TABLE_COLUMNS = ("rank", "train_idx", "path", "given_class", "predicted_class", "truly_mislabeled")  # the rest: detectors


def detect(results_dir: str, data_dir: str, out_dir: str | None = None, checkpoint_dir: str | None = None,
           score: str = DEFAULT_SCORE) -> dict:
    """The detectors' table and metrics, written to out_dir. checkpoint_dir: the training run's folder with its
    training_dynamics.npz (None: models/checkpoints; on an ensemble's results each member's own folder, and a given one
    must be a member's)."""
    results_dir = Path(results_dir)
    out = Owner(TOOL).folder(Path(out_dir) if out_dir else results_dir / "mislabel", "--out_dir").path
    r = load_results(results_dir, data_dir=data_dir, need=("train_loss_last", "train_pred_last"))
    listing = list_split(data_dir, "train")
    dynamics = dynamics_of_run(r.record, checkpoint_dir, len(listing.paths), listing.class_names)
    train_ids, pred = np.asarray(r["train_indices"]), np.asarray(r["train_pred_last"])
    scores = detector_scores(r, dynamics, train_ids)
    if score not in scores:
        why = {"aum": f"no training_dynamics.npz in {checkpoint_dir or 'models/checkpoints'} (pass --checkpoint_dir)",
               "forgetting": f"no training_dynamics.npz in {checkpoint_dir or 'models/checkpoints'} (pass --checkpoint_dir)"}.get(
            score, "the TracIn run did not compute it (rerun efficient_tracin.py without --no_self_influence)")
        raise UserError(f"--score {score} is not available: {why}; available: {', '.join(scores)}")
    names = np.asarray(listing.class_names)
    order = np.argsort(-np.nan_to_num(scores[score], nan=-np.inf), kind="stable")
    table = pd.DataFrame({
        "rank": np.arange(1, len(order) + 1),
        "train_idx": train_ids[order],
        "path": np.asarray(listing.paths)[train_ids[order]],
        "given_class": names[listing.labels[train_ids[order]]],
        "predicted_class": names[pred[order]],
        **{name: v[order] for name, v in scores.items()},
    })
    gt_path = Path(data_dir) / "mislabeled_ground_truth.csv"
    # what the table was computed from: a reader compares it with the TracIn run it sits beside
    report = {"n_train": int(len(train_ids)), "score": score, "detectors": list(scores), "tracin_run": run_id(r.record),
              "train_run": ",".join(str(d.get("train_run", "")) for d in dynamics) or None}
    figure = None
    if gt_path.exists():
        gt = read_table(gt_path, {"train_index": "int"}, f"re-prepare {data_dir}")
        is_bad = np.isin(train_ids, gt.train_index.to_numpy())
        table["truly_mislabeled"] = is_bad[order]
        report["n_mislabeled"] = int(is_bad.sum())
        report["metrics"] = {name: evaluate(np.nan_to_num(v, nan=-np.inf), is_bad) for name, v in scores.items()}
        shown = {name: v for name, v in scores.items() if name in (score, "self_influence", "self_influence_rank", "loss_last", "aum")}
        figure = plot_curves(shown, is_bad)
    with tool_folder(out, TOOL, {"tracin_run": report["tracin_run"], "train_run": report["train_run"],
                                 "data_train_key": r.record["data"].get("train_key")}, links=[CANDIDATES]) as build:
        if figure is not None:
            save_figure(build / "mislabel_detection.png", figure)
        save_csv(build / CANDIDATES, table)
        save_json(build / "mislabel_detection.json", report)
    return report


@dataclass
class Mislabel:
    """This tool's output for a run: the ranked table (rank, train_idx, path, given_class, predicted_class, one float
    column per detector, truly_mislabeled where noise was injected), its record (score, detectors, metrics,
    n_mislabeled) and the figure (None without injected noise)."""

    folder: Path
    candidates: pd.DataFrame
    record: dict
    detectors: list
    figure: Path | None


def load(results, notes: list[str] | None = None, folder=None) -> Mislabel | None:
    """The mislabel table of a run (a TracInResults or its folder; `folder`: another --out_dir than run/mislabel).
    Missing or stale (another TracIn run): one UserError line, or with `notes` a line there and None; unreadable:
    refused."""
    found = tool_output(results, "mislabel", TOOL, "no mislabel table: run python -m TracIn.mislabel_detection (it writes "
                                                   "mislabel/mislabel_candidates.csv)", notes, folder)
    return None if found is None else read(found)


def read(folder: Path) -> Mislabel:
    fix = "rerun python -m TracIn.mislabel_detection"
    record = read_json(folder / "mislabel_detection.json", fix)
    try:
        header = pd.read_csv(folder / CANDIDATES, nrows=0).columns
    except (OSError, ValueError):
        header = []  # read_table below names the file
    detectors = [str(c) for c in header if c not in TABLE_COLUMNS]
    table = read_table(folder / CANDIDATES, {"rank": "int", "train_idx": "int", "path": "str", **{d: "float" for d in detectors}},
                       fix)
    figure = folder / "mislabel_detection.png"
    return Mislabel(folder, table, record, detectors, figure if figure.is_file() else None)


def evaluate(scores: np.ndarray, is_bad: np.ndarray) -> dict:
    m = {f"recall_at_{int(f * 100)}pct": recall_at(scores, is_bad, f) for f in FRACTIONS}
    m["average_precision"] = average_precision(scores, is_bad)
    m["roc_auc"] = roc_auc(scores, is_bad)
    return m


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
    ax.set_xlim(0, min(1.0, 4 * is_bad.mean()))  # the part where rankings differ: up to 4x the noise rate
    ax.set_xlabel("fraction of training set inspected (dashed: the noise rate)")
    ax.set_ylabel("fraction of mislabeled images found")
    ax.set_title(f"Finding {int(is_bad.sum())} injected label errors")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="TracIn/results", help="efficient_tracin.py output (default TracIn/results)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--checkpoint_dir", default=None,
                   help="train.py's folder with training_dynamics.npz, for aum and forgetting (default models/checkpoints; "
                        "on an ensemble's results each member's own folder, and a given one must be a member's)")
    p.add_argument("--score", choices=DETECTORS, default=DEFAULT_SCORE,
                   help=f"detector that orders mislabel_candidates.csv (default {DEFAULT_SCORE}; see docs/mislabel.md)")
    p.add_argument("--out_dir", default=None, help="this tool's folder, replaced whole (default: results_dir/mislabel)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    r = detect(args.results_dir, args.data_dir, args.out_dir, args.checkpoint_dir, args.score)
    out = args.out_dir or Path(args.results_dir) / "mislabel"
    for name, m in r.get("metrics", {}).items():
        log.info(f"mislabel detection by {name:<20}: recall@5% {m['recall_at_5pct']:.3f}  recall@10% {m['recall_at_10pct']:.3f}  "
                 f"recall@20% {m['recall_at_20pct']:.3f}  AP {m['average_precision']:.3f}  ROC AUC {m['roc_auc']:.3f}"
                 f"{'   <- ranking' if name == args.score else ''}")
    log.info(f"mislabel candidates ranked by {args.score}: {out}/mislabel_candidates.csv")
    return 0


if __name__ == "__main__":
    cli(main)
