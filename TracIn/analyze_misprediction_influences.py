"""Join TracIn results with the model's mispredictions: which wrong training images drive wrong test predictions.

    $ python -m TracIn.analyze_misprediction_influences --results_dir TracIn/results \
        --false_predictions false_predictions/false_predictions.csv

Writes results_dir/misprediction/ (TracIn/core/run_folder.py: built whole, with inputs.json):
- misprediction_influence_analysis.csv: per mispredicted training image: appearances in
  top-k proponent/opponent lists, influence statistics, how many of the test images it
  supports are themselves mispredicted, and the class it pushes those predictions toward;
- misprediction_cross_analysis.csv: per (mispredicted test image, mispredicted training
  image among its proponents): test_idx, train_idx, both paths, true and predicted classes,
  influence, rank, and same_error (same true class and same wrong prediction);
- misprediction_summary.json: the figures printed below.
Both CSVs are linked at the results_dir root (the seed's paths), e.g. results_dir/misprediction_cross_analysis.csv.
Prints negative influences, high-impact mispredicted training images, the error-propagation
rate and the top confusion pairs.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.checkpoints import check_same_model
from lib.cli import UserError, cli, nonneg_int
from lib.data_utils import list_split, read_false_predictions
from lib.files import read_json, read_table, save_csv, save_json
from lib.ownership import Owner
from TracIn.core.results import appearances, load_results, other_training_run, run_id
from TracIn.core.run_folder import tool_folder, tool_output

log = logging.getLogger(__name__)
TOOL = "analyze_misprediction_influences"
INFLUENCE, CROSS = "misprediction_influence_analysis.csv", "misprediction_cross_analysis.csv"  # linked at the root too


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="TracIn/results", help="efficient_tracin.py output (default TracIn/results)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--false_predictions", default="false_predictions/false_predictions.csv", help="from false_prediction.py")
    p.add_argument("--out_dir", default=None, help="this tool's folder, replaced whole (default: results_dir/misprediction)")
    p.add_argument("--high_impact", type=nonneg_int, default=5,
                   help="a mispredicted training image is high-impact above this many top-k appearances (default 5)")
    return p.parse_args(argv)


def analyze(args) -> dict:
    out = Owner(TOOL).folder(Path(args.out_dir or Path(args.results_dir) / "misprediction"), "--out_dir").path
    r = load_results(args.results_dir, data_dir=args.data_dir)
    fp, fp_record = read_false_predictions(args.false_predictions, args.data_dir)
    other = other_training_run(fp_record.get("train_run"), r.record)
    if other:
        raise UserError(f"{args.false_predictions} does not belong with the TracIn run in {args.results_dir}: {other}; rerun "
                        "false_prediction.py and efficient_tracin.py on the same training run")
    check_same_model(r.record.get("model"), fp_record.get("model"),
                     f"{args.false_predictions} and the TracIn run in {args.results_dir}",
                     "run false_prediction.py and efficient_tracin.py on the selected model (their defaults), or pass "
                     "false_prediction.py --model the model the TracIn run explains")
    train_list, test_list = list_split(args.data_dir, "train"), list_split(args.data_dir, "test")
    for split, listing in (("train", train_list), ("test", test_list)):
        rows = fp[fp.split == split]
        bad = rows[(rows["index"] < 0) | (rows["index"] >= len(listing.paths))]
        if len(bad):
            raise UserError(f"{args.false_predictions}: {split} index {bad['index'].iloc[0]} is not an image of {args.data_dir}; "
                            "rerun false_prediction.py")
    wrong_train = fp[fp.split == "train"].set_index("index")
    wrong_test = fp[fp.split == "test"].set_index("index")
    test_ids = np.asarray(r["test_indices"])
    prop_i, prop_v = np.asarray(r["top_k_influences_indices"]), np.asarray(r["top_k_influences_values"])

    # pairs: mispredicted test image x mispredicted training image among its proponents
    rows = []
    for row, t in enumerate(test_ids):
        if t not in wrong_test.index:
            continue
        te = wrong_test.loc[t]
        for rank, (j, v) in enumerate(zip(prop_i[row], prop_v[row]), start=1):
            if j in wrong_train.index:
                tr = wrong_train.loc[j]
                rows.append((int(t), int(j), te.path, tr.path, te.true_label, te.pred_label, tr.true_label, tr.pred_label,
                             float(v), rank, bool(te.true_label == tr.true_label and te.pred_label == tr.pred_label)))
    cross = pd.DataFrame(rows, columns=["test_idx", "train_idx", "test_path", "train_path", "test_true", "test_pred",
                                        "train_true", "train_pred", "influence", "rank", "same_error"])

    # per mispredicted training image
    n_train = len(train_list.paths)
    prop_count, opp_count = appearances(r, "proponents", n_train), appearances(r, "opponents", n_train)
    test_pred_of_row = {row: wrong_test.loc[t].pred_label for row, t in enumerate(test_ids) if t in wrong_test.index}
    per = []
    for j, tr in wrong_train.iterrows():
        hits = np.argwhere(prop_i == j)  # (row, rank) pairs where it is a proponent
        vals = prop_v[hits[:, 0], hits[:, 1]] if len(hits) else np.array([])
        pushed = [test_pred_of_row[row] for row in hits[:, 0] if row in test_pred_of_row]
        per.append({
            "train_idx": int(j), "path": tr.path, "true_label": tr.true_label, "pred_label": tr.pred_label,
            "confidence": tr.confidence, "proponent_count": int(prop_count[j]), "opponent_count": int(opp_count[j]),
            "mean_influence_as_proponent": float(vals.mean()) if len(vals) else np.nan,
            "max_influence_as_proponent": float(vals.max()) if len(vals) else np.nan,
            "mispredicted_tests_supported": len(pushed),
            "pushes_toward": pd.Series(pushed).mode().iloc[0] if pushed else "",
            "self_influence": float(r.train_values("self_influence", j)[0]) if "self_influence" in r else np.nan,
        })
    per = pd.DataFrame(per, columns=["train_idx", "path", "true_label", "pred_label", "confidence", "proponent_count",
                                     "opponent_count", "mean_influence_as_proponent", "max_influence_as_proponent",
                                     "mispredicted_tests_supported", "pushes_toward", "self_influence"])
    per = per.sort_values(["proponent_count", "mispredicted_tests_supported"], ascending=False, kind="stable")

    test_patterns = set(zip(wrong_test.true_label, wrong_test.pred_label))
    train_patterns = list(zip(wrong_train.true_label, wrong_train.pred_label))
    propagation = float(np.mean([p in test_patterns for p in train_patterns])) if train_patterns else float("nan")
    confusion = (wrong_test.groupby(["true_label", "pred_label"]).size().sort_values(ascending=False).head(5))
    prop_all, opp_all = prop_v, np.asarray(r["top_k_opponents_values"])
    summary = {
        "mispredicted_train": len(wrong_train), "mispredicted_test": len(wrong_test),
        "negative_proponent_scores": int((prop_all < 0).sum()), "negative_opponent_scores": int((opp_all < 0).sum()),
        "scores_listed": int(prop_all.size + opp_all.size),
        "high_impact_train": per[per.proponent_count > args.high_impact].train_idx.tolist(),
        "error_propagation_rate": propagation, "cross_pairs": len(cross), "same_error_pairs": int(cross.same_error.sum()),
        "top_confusions": [f"{a} -> {b}: {n}" for (a, b), n in confusion.items()],
    }
    summary["tracin_run"] = run_id(r.record)  # what these tables were computed from
    inputs = {"tracin_run": summary["tracin_run"], "false_predictions": str(args.false_predictions),
              "model_sha256": fp_record.get("model_sha256")}
    with tool_folder(out, TOOL, inputs, links=[INFLUENCE, CROSS]) as build:
        save_csv(build / INFLUENCE, per)
        save_csv(build / CROSS, cross)
        save_json(build / "misprediction_summary.json", summary)
    return summary


@dataclass
class Mispredictions:
    """This tool's output for a run: its summary (the printed figures), the per-training-image table and the
    (test, proponent) pairs table."""

    folder: Path
    summary: dict
    influence: pd.DataFrame
    cross: pd.DataFrame


def load(results, notes: list[str] | None = None, folder=None) -> Mispredictions | None:
    """The misprediction tables of a run (a TracInResults or its folder; `folder`: another --out_dir than
    run/misprediction). Missing or stale: one UserError line, or with `notes` a line there and None; unreadable: refused."""
    found = tool_output(results, "misprediction", TOOL, "no misprediction tables: run python -m "
                                                        "TracIn.analyze_misprediction_influences", notes, folder)
    if found is None:
        return None
    fix = "rerun python -m TracIn.analyze_misprediction_influences"
    return Mispredictions(found, read_json(found / "misprediction_summary.json", fix),
                          read_table(found / INFLUENCE, {"train_idx": "int"}, fix),
                          read_table(found / CROSS, {"test_idx": "int", "train_idx": "int"}, fix))


def main(argv=None):
    args = parse_args(argv)
    s = analyze(args)
    log.info(f"mispredictions: {s['mispredicted_train']} train, {s['mispredicted_test']} test; negative influences: "
             f"{s['negative_proponent_scores'] + s['negative_opponent_scores']} of {s['scores_listed']} listed scores")
    log.info(f"high-impact mispredicted training images (> {args.high_impact} top-k appearances): {len(s['high_impact_train'])}; "
             f"error-propagation rate {s['error_propagation_rate']:.1%}; {s['cross_pairs']} (test, train) misprediction pairs, "
             f"{s['same_error_pairs']} with the same error")
    log.info(f"top confusions (test): {'; '.join(s['top_confusions']) or 'none'}")
    return 0


if __name__ == "__main__":
    cli(main)
