"""Print the closing report of `make demo` from the files the earlier steps wrote.

    $ python demo_report.py --seconds 412
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import UserError, cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models_dir", default="models", help="train.py output (default models)")
    p.add_argument("--eval_dir", default="models/evaluation", help="evaluate.py output (default models/evaluation)")
    p.add_argument("--results_dir", default="TracIn/results", help="TracIn output (default TracIn/results)")
    p.add_argument("--seconds", type=float, default=None, help="wall time of the whole job, to print")
    return p.parse_args(argv)


def read_json(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"{path} is missing; run the demo steps first (make demo)")
    return json.loads(path.read_text())


def main(argv=None):
    args = parse_args(argv)
    ev = read_json(Path(args.eval_dir) / "metrics_test.json")
    run = read_json(Path(args.results_dir) / "run.json")["summary"]
    det = read_json(Path(args.results_dir) / "mislabel_detection.json")
    si, lo = det["self_influence"], det["loss"]
    n_bad = det["n_mislabeled"]
    lines = [
        "=" * 72,
        "demo report",
        f"  test accuracy (clean labels): {ev['accuracy']:.4f} on {ev['n']} images   model: {ev['model']}",
        f"  TracIn: {run['pairs_scored']:,} pairs ({run['n_test']} test x {run['n_train']} train, {run['n_checkpoints']} checkpoints) "
        f"in {run['seconds_total']:.1f}s; negative share among opponents {run['opponent_negative_share']:.1%}",
        f"  injected mislabeled training images in the top 10% by self-influence: "
        f"{round(si['recall_at_10pct'] * n_bad)}/{n_bad} (recall {si['recall_at_10pct']:.3f}, ROC AUC {si['roc_auc']:.3f})",
        f"  loss baseline, top 10% by last-checkpoint training loss:        "
        f"{round(lo['recall_at_10pct'] * n_bad)}/{n_bad} (recall {lo['recall_at_10pct']:.3f}, ROC AUC {lo['roc_auc']:.3f})",
        f"  outputs: {args.eval_dir}/ (metrics, confusion matrix), {args.results_dir}/ (top-k .npy/.csv, self_influence.npy, "
        "mislabel_candidates.csv, mislabel_detection.png), models/checkpoints/",
    ]
    if args.seconds is not None:
        lines.append(f"  total time: {args.seconds / 60:.1f} min")
    lines.append("=" * 72)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    cli(main)
