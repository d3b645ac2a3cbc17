"""Cost of each --score_fn against normalised TracIn (the previous default), all from one complete factor cache.

    $ python -m bench.bench_score_cost                      # the MNIST demo cell of bench_mislabel (ResNet50, 4 checkpoints)
    $ python -m bench.bench_score_cost --results_dir TracIn/results --data_dir data/processed

Each score function re-scores the run's cache into a folder of its own (--cache_dir: no forward pass may run) three
times; the table gives the median of efficient_tracin's score stage (curvature, top-k both ways, self-influence) and
its ratio to normalised TracIn's, and the forward batches run (0 for every row: the curvature comes from the cached
training factors and logits).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job

ROWS = (("tracin --normalize train (previous default)", {"score_fn": "tracin", "normalize": "train"}),
        ("tracin --normalize none", {"score_fn": "tracin", "normalize": "none"}),
        ("tracin_last", {"score_fn": "tracin_last", "normalize": "none"}),
        ("influence_last (default)", {"score_fn": "influence_last"}),
        ("influence", {"score_fn": "influence"}),
        ("trak", {"score_fn": "trak"}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="bench/results/mislabel/mnist-uniform-10-resnet50-e4/results")
    p.add_argument("--data_dir", default="bench/results/mislabel/mnist-uniform-10-resnet50-e4/data")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    record = json.loads((Path(args.results_dir) / "run.json").read_text())
    base = {"data_dir": args.data_dir, "cache_dir": str(Path(args.results_dir) / "factors"), "device": "cpu", "num_workers": 0,
            "top_k": record["args"]["top_k"], "layers": record["args"]["layers"],
            "checkpoints": [c["path"] for c in record["checkpoints"]]}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for label, extra in ROWS:
            seconds, batches = [], None
            for r in range(args.repeats):
                s = tracin_job(TracInConfig(**base, output_dir=f"{work}/{len(rows)}-{r}", **extra))
                seconds.append(s["seconds_scores"])
                batches = s["batches_computed"]
            rows.append((label, statistics.median(seconds), batches))
    first = rows[0][1]
    print(f"score stage from the cache of {args.results_dir}: {record['summary']['n_test']} test x "
          f"{record['summary']['n_train']} train, {record['summary']['n_checkpoints']} checkpoints, layers "
          f"{' '.join(record['args']['layers'])}; median of {args.repeats}")
    print("| score_fn | seconds | x normalised TracIn | forward batches (train, test) |\n|---|---|---|---|")
    for label, s, b in rows:
        print(f"| {label} | {s:.2f} | {s / first:.2f} | {b['train']}, {b['test']} |")


if __name__ == "__main__":
    main()
