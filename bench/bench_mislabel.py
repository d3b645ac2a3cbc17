"""Every mislabel detector on two embedded real data sets x two noise kinds x two noise rates.

    $ python -m bench.bench_mislabel                     # the table in docs/mislabel.md (about 30 min on 2 cores)
    $ python -m bench.bench_mislabel --sets digits --rates 0.1 --epochs 2    # a quick look

Each cell runs the demo's pipeline (prepare with injected noise -> train.py with the demo's
settings -> efficient_tracin -> mislabel_detection) in bench/results/mislabel/<cell>/ and keeps
its mislabel_detection.json, so a killed run continues with the cells it lacks. Prints one table
per metric (ROC AUC, recall@10%, average precision): a row per detector, a column per cell,
and the mean over cells, which is what the default detector is chosen by.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

import prepare_data
import train
from TracIn import mislabel_detection
from TracIn.arguments import TracInConfig
from TracIn.job import tracin_job

ROOT = Path("bench/results/mislabel")


def run_cell(name: str, demo_set: str, kind: str, rate: float, args) -> dict:
    cell = ROOT / name
    result = cell / "results" / "mislabel" / "mislabel_detection.json"
    for done in (result, cell / "results" / "mislabel_detection.json"):  # the second: a cell of an older version
        if done.exists():
            return json.loads(done.read_text())
    t0 = time.time()
    raw = ROOT / f"raw-{demo_set}"
    assert prepare_data.main(["--demo", "--demo_set", demo_set, "--raw_dir", str(raw), "--out_dir", str(cell / "data"),
                              "--image_size", "32", "--label_noise", str(rate), "--noise_kind", kind, "--overwrite"]) == 0
    assert train.main(["--data_dir", str(cell / "data"), "--arch", args.arch, "--epochs", str(args.epochs), "--save_checkpoints_every", "1",
                       "--learning_rate", "1e-3", "--lr_schedule", "cosine", "--batch_size", "64", "--weights", "none",
                       "--no-hflip", "--checkpoint_dir", str(cell / "ckpt"), "--models_dir", str(cell / "models"), "--overwrite",
                       "--num_workers", "2"]) == 0
    tracin_job(TracInConfig(data_dir=str(cell / "data"), checkpoint_dir=str(cell / "ckpt"), output_dir=str(cell / "results"),
                            top_k=20, batch_size=64))
    assert mislabel_detection.main(["--results_dir", str(cell / "results"), "--data_dir", str(cell / "data"),
                                    "--checkpoint_dir", str(cell / "ckpt")]) == 0
    report = json.loads(result.read_text())
    report["seconds"] = time.time() - t0
    result.write_text(json.dumps(report, indent=2))
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "digits"], help="demo sets (default mnist digits)")
    p.add_argument("--kinds", nargs="+", default=["uniform", "pairwise"], help="noise kinds (default uniform pairwise)")
    p.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.2], help="noise rates (default 0.1 0.2)")
    p.add_argument("--arch", default="resnet50", help="model (default resnet50, as the demo)")
    p.add_argument("--epochs", type=int, default=4, help="epochs, a checkpoint after each (default 4, as the demo)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    cells = {}
    for demo_set in args.sets:
        for kind in args.kinds:
            for rate in args.rates:
                name = f"{demo_set}-{kind}-{int(rate * 100)}-{args.arch}-e{args.epochs}"
                cells[f"{demo_set} {kind} {int(rate * 100)}%"] = run_cell(name, demo_set, kind, rate, args)
                print(f"done: {name} ({cells[f'{demo_set} {kind} {int(rate * 100)}%'].get('seconds', 0):.0f}s)", flush=True)
    detectors = list(next(iter(cells.values()))["metrics"])
    for metric, label in (("roc_auc", "ROC AUC"), ("recall_at_10pct", "recall@10%"), ("average_precision", "average precision")):
        print(f"\n{label} ({args.arch}, {args.epochs} epochs, 32 px; columns: data set, noise kind, rate)")
        print("| detector | " + " | ".join(cells) + " | mean |")
        print("|---|" + "---:|" * (len(cells) + 1))
        for d in detectors:
            vals = [c["metrics"][d][metric] for c in cells.values()]
            print(f"| {d} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | **{np.mean(vals):.3f}** |")


if __name__ == "__main__":
    main()
