"""Full-retrain LDS of ensembles of K = 1, 2, 4, 8 independently trained members against one run: the table in
docs/ensembles.md.

    $ python -m bench.bench_ensemble                      # about an hour on 2 cores (most of it the 48 retrains per set)
    $ python -m bench.bench_ensemble --sets digits        # a quicker look
    $ python -m bench.bench_ensemble --fork_epoch 1       # cheap members: forks of the original after epoch 1

Cells as docs/lds.md's full-retrain table: MNIST (the demo's 5,000 digits) and scikit-learn's 8x8 digits, 32 px, 10%
uniform label noise; the original run is ResNet18 from scratch, 2 epochs, a checkpoint after each (Adam 1e-3, cosine,
batch 64). Members 1..7 are the same run with seeds + 1..7 (python -m TracIn.ensemble). For each K, efficient_tracin
--members (the first K, member 0 the original) into a results folder of its own with one shared factor cache; then
python -m TracIn.lds --retrain full on the same 48 random halves (12 choose the damping, 36 reported), 200 test
images, records shared by every K (the retrains depend on the data and the original run, not on how it is scored).
Training cost per row: K member trainings (seconds measured here). Everything stays in bench/results/ensemble/<set>/.
With --fork_epoch N the members are forks (TracIn.ensemble --fork_epoch N: the original's epoch-N weights, epochs
N+1.. with seed + k), scored against the same records; their cost is the original run plus K - 1 forks.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import prepare_data
import train
from TracIn import ensemble, lds
from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job

ROOT = Path("bench/results/ensemble")
METHODS = ["tracin", "tracin_last", "influence", "influence_last", "trak"]
KS = (1, 2, 4, 8)


def original_run(demo_set: str, cell: Path) -> float:
    """Prepared data and the original run (member 0); returns its training seconds."""
    if not (cell / "data" / "manifest.csv").exists():
        assert prepare_data.main(["--demo", "--demo_set", demo_set, "--raw_dir", str(ROOT / f"raw-{demo_set}"),
                                  "--out_dir", str(cell / "data"), "--image_size", "32", "--label_noise", "0.1",
                                  "--val_fraction", "0", "--overwrite"]) == 0
    seconds = cell / "original_seconds.json"
    if not seconds.exists():
        t0 = time.time()
        assert train.main(["--data_dir", str(cell / "data"), "--arch", "resnet18", "--epochs", "2", "--save_checkpoints_every", "1",
                           "--learning_rate", "1e-3", "--lr_schedule", "cosine", "--batch_size", "64", "--weights", "none",
                           "--no-hflip", "--checkpoint_dir", str(cell / "ckpt"), "--models_dir", str(cell / "models"),
                           "--overwrite", "--num_workers", "2"]) == 0
        seconds.write_text(json.dumps(time.time() - t0))
    return float(json.loads(seconds.read_text()))


def compare_means(demo_set: str) -> None:
    """From the K=8 run's records: each member's dense scores, then the plain mean (what --members ships) against the
    mean of scores scaled to unit spread per test image and the mean of ranks; LDS on the same reported subsets."""
    import numpy as np

    from TracIn.experiments import lds_score
    from TracIn.core.methods import CheckpointsView, FactorSet, METHODS, TRAK_DIM
    from TracIn.core.run import InfluenceRun

    cell = ROOT / demo_set
    ref = json.loads((cell / "lds-k8.json").read_text())
    group = np.asarray(ref["test_group"])
    run = InfluenceRun.from_results(cell / "results-k8")
    fs = run.group(group)
    recs = [lds_score.SubsetStore(cell / "lds", json.loads((cell / "lds" / "store.json").read_text())).load(j)
            for j in range(ref["num_subsets"])]
    masks, margins = lds_score.records_matrices(recs, run.n_train, group)
    rep = slice(ref["select_subsets"], None)
    for name, damping in (("influence_last", 10.0), ("trak", 100.0)):
        per = []
        for steps in fs.members:  # member k alone, as a FactorSet of its own checkpoints
            sub = FactorSet(CheckpointsView(fs.train_view, steps), CheckpointsView(fs.test_view, steps), [fs.lrs[t] for t in steps],
                            fs.layers, fs.train_labels, fs.test_labels, fs.device, fs.train_logits[steps],
                            fs.test_logits[steps], fs.block)
            per.append(sub.dense(METHODS[name], damping, TRAK_DIM))
        row = []
        for k in KS:
            means = (np.mean(per[:k], 0), np.mean([s / s.std(1, keepdims=True) for s in per[:k]], 0),
                     np.mean([np.argsort(np.argsort(s, 1), 1) for s in per[:k]], 0))
            row.append("/".join(f"{np.nanmean(lds_score.lds(m, masks[rep], margins[rep])):.3f}" for m in means))
        print(f"{demo_set} {name} (damping {damping:g}) plain/unit-spread/rank mean: "
              + ", ".join(f"K={k} {r}" for k, r in zip(KS, row)), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "digits"], help="demo sets (default mnist digits)")
    p.add_argument("--num_subsets", type=int, default=48, help="LDS subsets (default 48, as docs/lds.md's full table)")
    p.add_argument("--fork_epoch", type=int, default=0, help="0: independent members (default); N: forks after epoch N")
    p.add_argument("--ks", nargs="+", type=int, default=list(KS), help="ensemble sizes (default 1 2 4 8); members 1..max-1 "
                   "are trained (those already there are kept)")
    p.add_argument("--compare_means", action="store_true",
                   help="after a run: the plain mean of members' scores against unit-spread and rank means")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.compare_means:
        for demo_set in args.sets:
            compare_means(demo_set)
        return
    table = {}
    for demo_set in args.sets:
        cell = ROOT / demo_set
        t_original = original_run(demo_set, cell)
        t0 = time.time()
        kind = f"fork{args.fork_epoch}-" if args.fork_epoch else ""
        folders = ensemble.train_members(ensemble.parse_args(["--checkpoint_dir", str(cell / "ckpt"), "--members", str(max(args.ks)),
                                                              "--out_dir", str(cell / ("forks" if kind else "members")),
                                                              "--num_workers", "2", "--device", "cpu",
                                                              "--fork_epoch", str(args.fork_epoch)]))
        t_members = time.time() - t0
        timing = cell / f"{kind}members_seconds.json"  # a rerun finds the members trained: keep the first measurement
        if not timing.exists():
            timing.write_text(json.dumps(t_members / (max(args.ks) - 1)))
        t_member = float(json.loads(timing.read_text()))
        for k in args.ks:
            out = cell / f"results-{kind}k{k}"
            tracin_job(TracInConfig(data_dir=str(cell / "data"), members=[str(f) for f in folders[:k]], output_dir=str(out),
                                    cache_dir=str(cell / "factors"), top_k=20, batch_size=64, device="cpu"))
            r = lds.evaluate(lds.parse_args(["--results_dir", str(out), "--data_dir", str(cell / "data"), "--retrain", "full",
                                             "--num_subsets", str(args.num_subsets), "--out_dir", str(cell / "lds"),
                                             "--methods", *METHODS]))
            table[(demo_set, k)] = {"methods": r["methods"], "train_seconds": t_original + t_member * (k - 1)}
            (cell / f"lds-{kind}k{k}.json").write_text(json.dumps(r, indent=1, default=str))
            print(f"done: {demo_set} K={k}", flush=True)
        print(f"{demo_set}: original run {t_original:.0f}s, one {kind or 'independent '}member {t_member:.0f}s", flush=True)
    print("\nFull-retrain LDS [95% interval] (damping chosen on the selection subsets; influence_last also at the shipped 10)")
    for demo_set in args.sets:
        print(f"\n{demo_set}\n| method | " + " | ".join(f"K={k}" for k in args.ks) + " |\n|---|" + "---|" * len(args.ks))
        for m in METHODS:
            cells = []
            for k in args.ks:
                v = table[(demo_set, k)]["methods"][m]
                cells.append(f"{v['lds']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]")
            print(f"| {m} | " + " | ".join(cells) + " |")
        at10 = [table[(demo_set, k)]["methods"]["influence_last"] for k in args.ks]
        print("| influence_last at damping 10 (shipped) | " + " | ".join(
            f"{v['lds_at_default_damping']:.3f} [{v['ci95_at_default_damping'][0]:.3f}, {v['ci95_at_default_damping'][1]:.3f}]"
            for v in at10) + " |")
        print("| training (original + K - 1 members) | " + " | ".join(f"{table[(demo_set, k)]['train_seconds']:.0f}s" for k in args.ks) + " |")


if __name__ == "__main__":
    main()
