"""Print the closing report of `make demo` from the files the earlier steps wrote, each read through its tool's
reader (which refuses one of another TracIn run, data or model with one line).

    $ python demo_report.py --seconds 412
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lib.cli import cli
from lib.outputs import load_evaluation
from TracIn import analyze_misprediction_influences, analyze_topk_results, clean_and_retrain, counterfactual_check, lds
from TracIn import mislabel_detection
from TracIn.core.results import explained_model, load_results, recorded_data_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models_dir", default="models", help="train.py output (default models)")
    p.add_argument("--eval_dir", default="models/evaluation", help="evaluate.py output (default models/evaluation)")
    p.add_argument("--results_dir", default="TracIn/results", help="TracIn output (default TracIn/results)")
    p.add_argument("--seconds", type=float, default=None, help="wall time of the whole job, to print")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    results = load_results(args.results_dir)
    record = results.record
    run = record["summary"]
    # the demo's steps: each refused with one line when missing or of another TracIn run; the optional ones are notes
    det = mislabel_detection.load(results).record
    metrics, default = det.get("metrics") or {}, det.get("score")  # no metrics: the data have no injected label noise
    mis = analyze_misprediction_influences.load(results).summary
    top = analyze_topk_results.load(results).summary
    ev = load_evaluation(args.eval_dir, recorded_data_dir(record)).metrics
    notes: list[str] = []
    cr = clean_and_retrain.load(results, notes)
    cf = counterfactual_check.load(results, notes).get("head")
    ld = lds.load(results, notes)
    n_bad = det.get("n_mislabeled", 0)
    score_fn = record["args"]["score_fn"]
    lines = [
        "=" * 72,
        "demo report",
        (f"  model selected on val: val accuracy {ev['selection_accuracy']:.4f}; untouched test accuracy (clean labels): "
         if ev.get("selected_on") == "val" and ev.get("selection_accuracy") is not None else
         "  test accuracy (clean labels; the model was selected on test): ")
        + f"{ev['accuracy']:.4f} on {ev['n']} images   model: {ev['model']}",
        f"  explained: {explained_model(record)}, {record.get('checkpoints_chosen') or 'every checkpoint'}; evaluated: "
        f"epoch {(ev.get('model_record') or {}).get('epoch')} ({Path(str(ev['model'])).name})",
        f"  influence ({score_fn}): {run['pairs_scored']:,} pairs ({run['n_test']} test x {run['n_train']} train, {run['n_checkpoints']} checkpoints) "
        f"in {run['seconds_total']:.1f}s; negative share among opponents {run['opponent_negative_share']:.1%}",
        f"  mispredictions: {mis['mispredicted_test']} test, {mis['mispredicted_train']} train (given labels, noise included); "
        f"top confusions: {'; '.join(mis['top_confusions'][:3])}",
        f"  negative scores: {top['proponent_negative_share']:.1%} of proponents, {top['opponent_negative_share']:.1%} of opponents; "
        f"proponents share the test image's class {top['same_class_proponent_share']:.1%}",
        f"  error propagation: {mis['error_propagation_rate']:.1%} of mispredicted training images repeat a test error pattern; "
        f"{mis['same_error_pairs']} (test, proponent) pairs share the same error",
        f"  injected mislabeled training images found in the top 10% (recall, average precision, ROC AUC), {n_bad} injected:"
        if metrics else "  mislabel detection not measured: these data have no injected label noise (prepare_data.py --label_noise)",
        *[f"    {name:<20} {round(metrics[name]['recall_at_10pct'] * n_bad):>4}/{n_bad} ({metrics[name]['recall_at_10pct']:.3f}, "
          f"{metrics[name]['average_precision']:.3f}, {metrics[name]['roc_auc']:.3f})"
          + {default: "   <- default ranking (mislabel_candidates.csv)", "self_influence": "   <- TracIn as in the paper",
             "loss_last": "   <- baseline: last-checkpoint loss"}.get(name, "")
          for name in dict.fromkeys((default, "self_influence_rank", "self_influence", "loss_last")) if name in metrics],
        f"  figures: {args.results_dir}/analysis/dashboard.png, {args.results_dir}/analysis/panels/, "
        f"{args.results_dir}/mislabel/mislabel_detection.png, false_predictions/combined_mispredictions.png, "
        f"false_predictions/gradcam_mispredictions.png, {args.eval_dir}/confusion_matrix_test.png",
        f"  tables: {args.results_dir}/top_k_influences.csv, mislabel_candidates.csv, misprediction_influence_analysis.csv "
        f"(links into mislabel/ and misprediction/), analysis/most_influential.csv, false_predictions/false_predictions.csv",
    ]
    if cr is not None:
        a = cr["arms"]
        lines.insert(-2, f"  clean and retrain ({cr['settings']['arch']}, {cr['settings']['epochs']} epoch{'s' if cr['settings']['epochs'] != 1 else ''}, drop {cr['fraction']:.0%}): test accuracy "
                         f"{cr['score']} {a[cr['score']]['test_accuracy']:.4f} (dropped {a[cr['score']]['dropped_truly_mislabeled']} injected errors), "
                         f"self_influence {a['self_influence']['test_accuracy']:.4f}, random {cr['random_mean']:.4f} "
                         f"(n={sum(k.startswith('random_') for k in a)}, range {cr['random_range'][0]:.4f}-{cr['random_range'][1]:.4f})"
                         + (f", nothing dropped {a['none']['test_accuracy']:.4f}" if "none" in a else ""))
    if cf is not None:
        k, sm = max(cf["k"]), cf["summary"]
        cell = lambda m: f"{sm[f'{m}@{k}']['d_loss_mean']:+.3f} +- {sm[f'{m}@{k}']['d_loss_std']:.3f}"
        lines.insert(-2, f"  counterfactual check (retrain {cf['retrain']}, {len(cf['group'])} test images, top {k} each removed, "
                         f"{cf['seeds']} seeds): group loss change "
                         + ", ".join(f"{m} {cell(m)}" + (" (beats random)" if sm[f'{m}@{k}'].get("beats_random") else "")
                                     for m in cf["methods"]))
    if ld is not None:
        lines.insert(-2, f"  LDS ({ld['retrain']} retrain, {ld['reported_subsets']} subsets of {ld['fraction']:.0%}, {ld['n_test']} test images; "
                         "Spearman of predicted vs retrained margins, 95% interval): "
                         + ", ".join(f"{m} {r['lds']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" for m, r in ld["methods"].items()))
    lines[-2:-2] = [f"  not shown: {note}" for note in notes]
    if args.seconds is not None:
        lines.append(f"  total time: {args.seconds / 60:.1f} min")
    lines.append("=" * 72)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    cli(main)
