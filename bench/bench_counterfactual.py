"""The counterfactual removal check on two embedded real data sets in two settings: the table in docs/counterfactual.md.

    $ python -m bench.bench_counterfactual                 # about 45 min on 2 cores
    $ python -m bench.bench_counterfactual --sets digits   # a quicker look

Settings, each on MNIST (the demo's 5,000 digits) and sklearn's 8x8 digits, 10% uniform label noise:
- head: the demo's run (ResNet50 from scratch, 4 epochs, 32 px; bench_mislabel's cell, made here if
  missing), fc retrained on the last checkpoint's features, every method including knn;
- full: an original run of ResNet18, 2 epochs (a checkpoint after each), and every arm retrained the
  same way with train.py (ResNet50 retrains would take 4 min each on 2 cores; 21 of them per data set).
Each cell keeps its counterfactual.json in bench/results/counterfactual/<cell>/, so a killed run
continues with the cells it lacks. Prints, per method and k, the paired change in the group's mean
loss (mean +- std over 3 training seeds) beside the random control's, and whether it beats it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import train
from bench.bench_mislabel import ROOT as MISLABEL_ROOT, run_cell
from TracIn import counterfactual_check
from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job

ROOT = Path("bench/results/counterfactual")
COMMON = ["--n_test", "10", "--k", "10", "40", "--seeds", "3", "--seed", "0"]


def head_cell(demo_set: str) -> dict:
    out = ROOT / f"{demo_set}-head-resnet50-e4"
    if not (out / "counterfactual.json").exists():
        name = f"{demo_set}-uniform-10-resnet50-e4"
        run_cell(name, demo_set, "uniform", 0.1, argparse.Namespace(arch="resnet50", epochs=4))
        cell = MISLABEL_ROOT / name
        assert counterfactual_check.main(["--results_dir", str(cell / "results"), "--data_dir", str(cell / "data"),
                                          "--out_dir", str(out), "--retrain", "head", *COMMON]) == 0
    return json.loads((out / "counterfactual.json").read_text())


def resnet18_run(data: Path, out: Path, top_k: int) -> None:
    """The full-retrain original: ResNet18, 2 epochs, a checkpoint after each, and TracIn over them, in out/."""
    assert train.main(["--data_dir", str(data), "--arch", "resnet18", "--epochs", "2", "--save_checkpoints_every", "1",
                       "--learning_rate", "1e-3", "--lr_schedule", "cosine", "--batch_size", "64", "--weights", "none",
                       "--no-hflip", "--checkpoint_dir", str(out / "ckpt"), "--models_dir", str(out / "models"),
                       "--overwrite"]) == 0
    tracin_job(TracInConfig(data_dir=str(data), checkpoint_dir=str(out / "ckpt"), output_dir=str(out / "results"), top_k=top_k,
                            batch_size=64))


def full_cell(demo_set: str) -> dict:
    out = ROOT / f"{demo_set}-full-resnet18-e2"
    if not (out / "counterfactual.json").exists():
        name = f"{demo_set}-uniform-10-resnet50-e4"
        run_cell(name, demo_set, "uniform", 0.1, argparse.Namespace(arch="resnet50", epochs=4))  # its prepared data
        data = MISLABEL_ROOT / name / "data"
        resnet18_run(data, out, top_k=40)
        assert counterfactual_check.main(["--results_dir", str(out / "results"), "--data_dir", str(data), "--out_dir", str(out),
                                          "--retrain", "full", "--methods", "tracin", "tracin_normalized", "random", *COMMON]) == 0
    return json.loads((out / "counterfactual.json").read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "digits"], help="demo sets (default mnist digits)")
    p.add_argument("--settings", nargs="+", default=["head", "full"], help="head and/or full (default both)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    cells = {}
    for setting in args.settings:
        for demo_set in args.sets:
            cells[f"{demo_set} {setting}"] = (head_cell if setting == "head" else full_cell)(demo_set)
            print(f"done: {demo_set} {setting} ({cells[f'{demo_set} {setting}']['seconds']:.0f}s)", flush=True)
    print("\nChange of the test group's mean loss when each method's top-k proponents of the group are removed and the "
          "model retrained\n(arm minus nothing removed, same seed; mean +- std over 3 seeds; images removed; "
          "**beats** = gap to random > both stds)")
    rows = sorted({(m, k) for c in cells.values() for m in c["methods"] for k in c["k"]},
                  key=lambda mk: (counterfactual_check.METHODS.index(mk[0]), mk[1]))
    print("| method | k | " + " | ".join(cells) + " |")
    print("|---|---:|" + "---|" * len(cells))
    for m, k in rows:
        vals = []
        for c in cells.values():
            s = c["summary"].get(f"{m}@{k}")
            if s is None:
                vals.append("-")
                continue
            mark = " **beats**" if s.get("beats_random") else ""
            vals.append(f"{s['d_loss_mean']:+.3f} +- {s['d_loss_std']:.3f} ({s['removed']:.0f}){mark}")
        print(f"| {m} | {k} | " + " | ".join(vals) + " |")
    print("\nPredictions flipped in the group of 10 (mean over seeds)")
    print("| method | k | " + " | ".join(cells) + " |")
    print("|---|---:|" + "---|" * len(cells))
    for m, k in rows:
        vals = [f"{c['summary'][f'{m}@{k}']['d_flips_mean']:.1f}" if f"{m}@{k}" in c["summary"] else "-" for c in cells.values()]
        print(f"| {m} | {k} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
