"""Does acting on a mislabel ranking help? Drop its top m%, retrain, compare with random drops.

    $ python -m TracIn.clean_and_retrain --fraction 0.1 --random_seeds 3
    $ python -m TracIn.clean_and_retrain --arch resnet18 --epochs 2     # a cheaper retrain (the demo's)

Arms, each retrained with train.py from the same initial seed and schedule as the original run
(read from checkpoint_dir/train_args.json; --arch/--epochs may make it cheaper, said in the output):
- none: nothing dropped (the reference);
- the default detector (mislabel_detection.DEFAULT_SCORE, or --score): its top m% dropped;
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
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from common import (UserError, check_replaceable, cli, fraction, mark_owned, nonneg_int, positive_int, read_json, read_table,
                    remove_inside_owned, save_csv, save_json)
from data_utils import list_split, listing_key
from model_architecture import find_checkpoints, load_checkpoint
from TracIn.mislabel_detection import DEFAULT_SCORE, DETECTORS, detector_scores
from TracIn.results import load_results, run_id
from training_dynamics import load_dynamics

log = logging.getLogger(__name__)
TOOL = "clean_and_retrain"
TRAIN_FLAGS = ("arch", "epochs", "batch_size", "learning_rate", "lr_schedule", "weight_decay", "image_size", "weights", "seed", "hflip")


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


def original_settings(checkpoint_dir: Path, arch: str | None = None, epochs: int | None = None) -> dict:
    """The original run's train.py settings (train_args.json); a given arch or epochs makes the retrains cheaper."""
    path = checkpoint_dir / "train_args.json"
    if not path.exists():
        raise UserError(f"{checkpoint_dir} has no train_args.json: its checkpoints do not record how they were trained "
                        "(seed, schedule); pass the --checkpoint_dir of a train.py run")
    saved = read_json(path, "retrain with this version of train.py first")
    missing = [k for k in TRAIN_FLAGS if k not in saved]
    if missing:
        raise UserError(f"{path} does not record {', '.join(missing)}; retrain with this version of train.py first")
    settings = {k: saved[k] for k in TRAIN_FLAGS}
    settings.update({k: v for k, v in (("arch", arch), ("epochs", epochs)) if v})
    return settings


def original_exclusions(checkpoint_dir: Path, train_list) -> np.ndarray:
    """The training images the original run left out (train.py --exclude): every retrain leaves them out too.
    Refused when the data changed since that run (the indices would name other images)."""
    saved = read_json(Path(checkpoint_dir) / "train_args.json", "retrain with this version of train.py first")
    excluded = np.asarray((saved.get("excluded") or {}).get("train_idx", []), dtype=np.int64)
    key = saved.get("data_train_key")
    if key is not None and key != listing_key(train_list):
        raise UserError(f"the training data changed since the run in {checkpoint_dir} (content key then {key}, now "
                        f"{listing_key(train_list)}); retrain it on this data first")
    if len(excluded) and key is None:
        raise UserError(f"{checkpoint_dir}/train_args.json records exclusions but not the data they index; retrain with this "
                        "version of train.py first")
    return excluded


def claim_arms_folder(out: Path, tool: str, flag: str) -> Path:
    """The folder of a removal experiment's arms: new, empty or already `tool`'s; marked as `tool`'s before any arm."""
    check_replaceable(out, tool, flag)
    mark_owned(out, tool)
    return out


def train_without(arm_dir: Path, settings: dict, data_dir: str, drop: np.ndarray, train_list, num_workers: int, device: str,
                  tag: str, owner: Path, tool: str) -> Path:
    """train.py with `settings` (see original_settings) on the training split less `drop` (split indices),
    in its own process as a user runs it; returns the last checkpoint. Shared with counterfactual_check.
    A previous arm folder is deleted only inside `owner`, a folder `tool` marked as its own."""
    if arm_dir.exists():
        remove_inside_owned(arm_dir, owner, tool)
    arm_dir.mkdir(parents=True)
    exclude = arm_dir / "exclude.csv"
    save_csv(exclude, pd.DataFrame({"train_idx": np.sort(drop), "path": np.asarray(train_list.paths)[np.sort(drop)]}))
    argv = ["--data_dir", data_dir, "--checkpoint_dir", str(arm_dir / "checkpoints"), "--models_dir", str(arm_dir / "models"),
            "--exclude", str(exclude), "--save_checkpoints_every", str(settings["epochs"]), "--num_workers", str(num_workers),
            "--device", device, "--dataset_tag", tag]
    for k, v in settings.items():
        if k == "weights" and v not in ("imagenet", "none") and not Path(v).exists():
            raise UserError(f"the original run's --weights {v} is gone; cannot retrain the same way")
        if k == "hflip":
            argv.append("--hflip" if v else "--no-hflip")
        elif v is not None:
            argv += [f"--{k}", str(v)]
    rc = subprocess.run([sys.executable, "-m", "train", *argv]).returncode
    if rc != 0:
        raise UserError(f"retraining the arm in {arm_dir} failed (train.py exit code {rc}; its error is printed above)")
    return find_checkpoints(arm_dir / "checkpoints")[-1]


def clean_and_retrain(args) -> dict:
    ckpt_dir = Path(args.checkpoint_dir)
    settings = original_settings(ckpt_dir, args.arch, args.epochs)
    train_list = list_split(args.data_dir, "train")
    r = load_results(args.results_dir, data_dir=args.data_dir, need=("self_influence",))
    train_ids = np.asarray(r["train_indices"])
    if len(train_ids) != len(train_list.paths):
        raise UserError(f"{args.results_dir} scored a --train_subset; clean-and-retrain needs every training image scored")
    dynamics = load_dynamics(ckpt_dir, len(train_list.paths), train_list.class_names,
                             train_runs=[c.get("train_run") for c in r.record["checkpoints"]])
    scores = detector_scores(r, dynamics, train_ids)
    if args.score not in scores:
        raise UserError(f"--score {args.score} is not available for these results (available: {', '.join(scores)})")
    already = original_exclusions(ckpt_dir, train_list)  # left out of the original run: out of every arm too
    m = int(round(args.fraction * len(train_ids)))
    open_ids = ~np.isin(train_ids, already)
    top = lambda s: train_ids[open_ids][np.argsort(-np.nan_to_num(s[open_ids], nan=-np.inf), kind="stable")[:m]]
    arms = ([("none", np.zeros(0, dtype=np.int64))] if not args.no_reference else [])
    arms += [(args.score, top(scores[args.score]))]
    if args.score != "self_influence":
        arms.append(("self_influence", top(scores["self_influence"])))
    arms += [(f"random_{s}", np.random.default_rng(1000 + s).choice(train_ids[open_ids], size=m, replace=False))
             for s in range(args.random_seeds)]
    out = claim_arms_folder(Path(args.out_dir or Path(args.results_dir) / "clean_and_retrain"), TOOL, "--out_dir")
    gt_path = Path(args.data_dir) / "mislabeled_ground_truth.csv"
    bad = set(read_table(gt_path, {"train_index": "int"}, f"re-prepare {args.data_dir}").train_index) if gt_path.exists() else None
    results = {}
    for name, drop in arms:
        last = train_without(out / name, settings, args.data_dir, np.union1d(drop, already), train_list, args.num_workers,
                             args.device, "clean_and_retrain", out, TOOL)
        acc = float(load_checkpoint(last)["metrics"]["val_acc"])
        results[name] = {"test_accuracy": acc, "dropped": int(len(drop)),
                         "dropped_truly_mislabeled": None if bad is None else int(len(set(drop.tolist()) & bad))}
        log.info(f"clean-and-retrain arm {name:<16}: dropped {len(drop)}, test accuracy {acc:.4f}")
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
