"""Every mislabel detector on two embedded real data sets x two noise kinds x two noise rates.

    $ python -m bench.bench_mislabel                     # the table in docs/mislabel.md (about 30 min on 2 cores)
    $ python -m bench.bench_mislabel --sets digits --rates 0.1 --epochs 2    # a quick look
    $ python -m bench.bench_mislabel --members 4 --fork_epoch 2  # and every detector over 4 members (3 forks) per cell

Each cell runs the demo's pipeline (prepare with injected noise -> train.py with the demo's
settings -> efficient_tracin -> mislabel_detection) in bench/results/mislabel/<cell>/ and keeps
its mislabel_detection.json, so a killed run continues with the cells it lacks. Prints one table
per metric (ROC AUC, recall@10%, average precision): a row per detector, a column per cell,
and the mean over cells, which is what the default detector is chosen by. With --members K each cell also trains K - 1
members of its run (TracIn.ensemble; forks after epoch --fork_epoch, or independent with 0), scores them together
(efficient_tracin --members) and ranks with every detector over the members, beside the one-run rows; plus
`ensemble_member_ranks`: the default's rank mean taken per member, then averaged over members.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

import prepare_data
import train
from lib.data_utils import list_split
from lib.training_dynamics import dynamics_of_run
from TracIn import detectors, ensemble, mislabel_detection
from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job
from TracIn.core.results import load_results

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
                              "--image_size", "32", "--label_noise", str(rate), "--noise_kind", kind, "--overwrite",
                              "--val_fraction", "0"]) == 0  # the split docs/mislabel.md's table was measured on
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


def run_members(name: str, args) -> dict:
    """K - 1 members of the cell's run, every detector over the K; kept in <cell>/mislabel-<kind>k<K>.json."""
    cell = ROOT / name
    kind = f"fork{args.fork_epoch}-" if args.fork_epoch else ""
    done = cell / f"mislabel-{kind}k{args.members}.json"
    if done.exists():
        return json.loads(done.read_text())
    t0 = time.time()
    folders = ensemble.train_members(ensemble.parse_args([
        "--checkpoint_dir", str(cell / "ckpt"), "--members", str(args.members), "--out_dir",
        str(cell / (f"forks{args.fork_epoch}" if kind else "members")), "--fork_epoch", str(args.fork_epoch),
        "--num_workers", "2", "--device", "cpu"]))
    t_train = time.time() - t0
    out = cell / f"results-{kind}k{args.members}"
    tracin_job(TracInConfig(data_dir=str(cell / "data"), members=[str(f) for f in folders], output_dir=str(out), top_k=20,
                            batch_size=64))
    assert mislabel_detection.main(["--results_dir", str(out), "--data_dir", str(cell / "data")]) == 0
    report = json.loads((out / "mislabel" / "mislabel_detection.json").read_text())
    # the default's rank mean per member (its own last loss and AUM), averaged over members
    r = load_results(out)
    train_ids = np.asarray(r["train_indices"])
    listing = list_split(str(cell / "data"), "train")
    dyn = dynamics_of_run(r.record, None, len(listing.paths), listing.class_names)
    last = np.cumsum(r.record["args"]["member_sizes"]) - 1
    loss = np.asarray(r["train_loss_per_ckpt"], dtype=np.float64)[last]
    q = detectors.rank_quantile
    per = [(q(loss[k]) + q(detectors.aum(d["margin"][:, train_ids]))) / 2 for k, d in enumerate(dyn)]
    is_bad = np.isin(train_ids, pd.read_csv(cell / "data" / "mislabeled_ground_truth.csv").train_index.to_numpy())
    report["metrics"]["ensemble_member_ranks"] = mislabel_detection.evaluate(np.mean(per, axis=0), is_bad)
    report["train_seconds_members"], report["seconds"] = t_train, time.time() - t0
    done.write_text(json.dumps(report, indent=2))
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "digits"], help="demo sets (default mnist digits)")
    p.add_argument("--kinds", nargs="+", default=["uniform", "pairwise"], help="noise kinds (default uniform pairwise)")
    p.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.2], help="noise rates (default 0.1 0.2)")
    p.add_argument("--arch", default="resnet50", help="model (default resnet50, as the demo)")
    p.add_argument("--epochs", type=int, default=4, help="epochs, a checkpoint after each (default 4, as the demo)")
    p.add_argument("--members", type=int, default=1, help="K > 1: also every detector over K members per cell (default 1)")
    p.add_argument("--fork_epoch", type=int, default=0, help="members: forks after this epoch; 0 independent (default 0)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    cells, with_members = {}, {}
    for demo_set in args.sets:
        for kind in args.kinds:
            for rate in args.rates:
                name = f"{demo_set}-{kind}-{int(rate * 100)}-{args.arch}-e{args.epochs}"
                cells[f"{demo_set} {kind} {int(rate * 100)}%"] = run_cell(name, demo_set, kind, rate, args)
                print(f"done: {name} ({cells[f'{demo_set} {kind} {int(rate * 100)}%'].get('seconds', 0):.0f}s)", flush=True)
                if args.members > 1:
                    with_members[f"{demo_set} {kind} {int(rate * 100)}%"] = m = run_members(name, args)
                    print(f"done: {name} with {args.members} members ({m['seconds']:.0f}s, members' training "
                          f"{m['train_seconds_members']:.0f}s)", flush=True)
    detectors = list(next(iter(cells.values()))["metrics"])
    label = f" over {args.members} members ({f'forks after epoch {args.fork_epoch}' if args.fork_epoch else 'independent'})"
    rows = [(d, cells, d) for d in detectors]
    if with_members:
        rows += [(d + label, with_members, d) for d in list(next(iter(with_members.values()))["metrics"])]
    for metric, label in (("roc_auc", "ROC AUC"), ("recall_at_10pct", "recall@10%"), ("average_precision", "average precision")):
        print(f"\n{label} ({args.arch}, {args.epochs} epochs, 32 px; columns: data set, noise kind, rate)")
        print("| detector | " + " | ".join(cells) + " | mean |")
        print("|---|" + "---:|" * (len(cells) + 1))
        for d, source, key in rows:
            vals = [c["metrics"][key][metric] for c in source.values()]
            print(f"| {d} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | **{np.mean(vals):.3f}** |")


if __name__ == "__main__":
    main()
