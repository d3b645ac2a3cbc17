"""Does acting on a mislabel ranking help? Drop its top m%, retrain, compare with random drops.

    $ python -m TracIn.clean_and_retrain --fraction 0.1 --random_seeds 3
    $ python -m TracIn.clean_and_retrain --arch resnet18 --epochs 2     # a cheaper retrain (the demo's)

Arms, each retrained with train.py from the same initial seed and schedule as the original run
(read from checkpoint_dir/train_args.json; --arch/--epochs may make it cheaper, said in the output):
- none: nothing dropped (the reference);
- the default detector (detectors.DEFAULT_SCORE, or --score): its top m% dropped;
- self_influence: TracIn's own score, top m% dropped;
- random: a random m%, once per --random_seeds, giving the seed-to-seed spread.
Each arm's figure is the test accuracy after the last epoch, on the test split (whose labels are
clean: prepare_data.py injects noise into the training split only). Writes
results_dir/clean_and_retrain/clean_and_retrain.json and one folder per arm (checkpoints, the
exclusion list it trained with).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from lib.checkpoints import load_checkpoint
from lib.cli import UserError, cli, fraction, nonneg_int, positive_int
from lib.data_utils import list_split
from lib.devices import resolve_device
from lib.files import read_table, save_json
from lib.ownership import Owner
from lib.training_dynamics import dynamics_of_run
from TracIn.core.results import load_results, run_id
from TracIn.core.run_folder import record_inputs, tool_record
from TracIn.detectors import DEFAULT_SCORE, DETECTORS, detector_scores
from TracIn.experiments.retraining import (Arm, Retrainer, full_test_logits, original_exclusions, original_settings,
                                           run_arms)

log = logging.getLogger(__name__)
TOOL = "clean_and_retrain"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="TracIn/results", help="efficient_tracin.py output (default TracIn/results)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--checkpoint_dir", default="models/checkpoints", help="the original run's checkpoints (default models/checkpoints)")
    p.add_argument("--out_dir", default=None, help="work and output folder (default results_dir/clean_and_retrain)")
    p.add_argument("--fraction", type=fraction(0.0, 0.5, lo_open=True), default=0.1, help="share of training images dropped (default 0.1)")
    p.add_argument("--score", choices=DETECTORS, default=DEFAULT_SCORE, help=f"detector of the main arm (default {DEFAULT_SCORE})")
    p.add_argument("--random_seeds", type=positive_int, default=3, help="random-drop arms, one per seed (default 3)")
    p.add_argument("--no_reference", action="store_true", help="skip the nothing-dropped arm")
    p.add_argument("--arch", default=None, help="retrain with this architecture (default: the original run's)")
    p.add_argument("--epochs", type=positive_int, default=None, help="retrain for this many epochs (default: the original run's)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="data loader workers (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    return p.parse_args(argv)


def clean_and_retrain(args) -> dict:
    ckpt_dir = Path(args.checkpoint_dir)
    settings = original_settings(ckpt_dir, args.arch, args.epochs)
    train_list = list_split(args.data_dir, "train")
    r = load_results(args.results_dir, data_dir=args.data_dir, need=("self_influence",))
    train_ids = np.asarray(r["train_indices"])
    if len(train_ids) != len(train_list.paths):
        raise UserError(f"{args.results_dir} scored a --train_subset; clean-and-retrain needs every training image scored")
    dynamics = dynamics_of_run(r.record, ckpt_dir, len(train_list.paths), train_list.class_names)
    scores = detector_scores(r, dynamics, train_ids)
    if args.score not in scores:
        raise UserError(f"--score {args.score} is not available for these results (available: {', '.join(scores)})")
    already = original_exclusions(ckpt_dir, train_list)  # left out of the original run: out of every arm too
    m = int(round(args.fraction * len(train_ids)))
    open_ids = ~np.isin(train_ids, already)
    top = lambda s: train_ids[open_ids][np.argsort(-np.nan_to_num(s[open_ids], nan=-np.inf), kind="stable")[:m]]
    seed = int(settings["seed"])  # every arm starts from the original run's seed: only what is dropped differs
    arms = ([Arm("none", np.zeros(0, dtype=np.int64), seed)] if not args.no_reference else [])
    arms += [Arm(args.score, top(scores[args.score]), seed)]
    if args.score != "self_influence":
        arms.append(Arm("self_influence", top(scores["self_influence"]), seed))
    arms += [Arm(f"random_{s}", np.random.default_rng(1000 + s).choice(train_ids[open_ids], size=m, replace=False), seed)
             for s in range(args.random_seeds)]
    out = Owner(TOOL).folder(Path(args.out_dir or Path(args.results_dir) / "clean_and_retrain"), "--out_dir").fill().path
    record_inputs(out, TOOL, {"tracin_run": run_id(r.record)})
    retrainer = Retrainer("full", settings, args.data_dir, train_list, already, out, out, TOOL, args.num_workers, args.device)
    gt_path = Path(args.data_dir) / "mislabeled_ground_truth.csv"
    bad = set(read_table(gt_path, {"train_index": "int"}, f"re-prepare {args.data_dir}").train_index) if gt_path.exists() else None

    test_labels = list_split(args.data_dir, "test").labels

    def measure(arm: Arm) -> dict:
        path = retrainer.checkpoint(arm)
        ckpt = load_checkpoint(path)
        if ckpt.get("selection_split", "test") == "test":  # train.py's last evaluation was on the test split already
            accuracy = float(ckpt["metrics"]["val_acc"])
        else:  # it selected on val: the test split is predicted here
            logits = full_test_logits(path, args.data_dir, args.num_workers, resolve_device(args.device))
            accuracy = float((logits.argmax(1) == test_labels).mean())
        return {"test_accuracy": accuracy,
                "dropped": int(len(arm.drop)),
                "dropped_truly_mislabeled": None if bad is None else int(len(set(arm.drop.tolist()) & bad))}

    rows = run_arms(arms, measure, lambda row: f"dropped {row['dropped']}, test accuracy {row['test_accuracy']:.4f}")
    results = {arm.name: {k: row[k] for k in ("test_accuracy", "dropped", "dropped_truly_mislabeled")}
               for arm, row in zip(arms, rows)}
    rand = np.array([v["test_accuracy"] for k, v in results.items() if k.startswith("random_")])
    summary = {
        "fraction": args.fraction, "score": args.score, "settings": settings, "arms": results,
        "random_mean": float(rand.mean()), "random_std": float(rand.std(ddof=1)) if len(rand) > 1 else float("nan"),
        "random_range": [float(rand.min()), float(rand.max())], "originally_excluded": int(len(already)),
        "tracin_run": run_id(r.record),
        "gain_over_random": results[args.score]["test_accuracy"] - float(rand.mean()),
        "self_influence_gain_over_random": results["self_influence"]["test_accuracy"] - float(rand.mean()),
    }
    save_json(out / "clean_and_retrain.json", summary)
    return summary


def load(results, notes: list[str] | None = None, path=None) -> dict | None:
    """clean_and_retrain.json of a run (a TracInResults or its folder; `path`: another --out_dir's), of this TracIn run.
    Missing or stale: one UserError line, or with `notes` a line there and None; unreadable: refused."""
    return tool_record(results, "clean_and_retrain/clean_and_retrain.json", "no clean-and-retrain result: run python -m "
                       "TracIn.clean_and_retrain", notes, path, "rerun python -m TracIn.clean_and_retrain")


def main(argv=None):
    args = parse_args(argv)
    s = clean_and_retrain(args)
    a = s["arms"]
    log.info(f"clean-and-retrain ({s['settings']['arch']}, {s['settings']['epochs']} epochs, drop {s['fraction']:.0%}): "
             f"{s['score']} {a[s['score']]['test_accuracy']:.4f}, self_influence {a['self_influence']['test_accuracy']:.4f}, "
             f"random {s['random_mean']:.4f} +- {s['random_std']:.4f} (n={len([k for k in a if k.startswith('random_')])})"
             + (f", nothing dropped {a['none']['test_accuracy']:.4f}" if "none" in a else ""))
    return 0


if __name__ == "__main__":
    cli(main)
