"""Re-scoring from the factor cache: time and forward batches of changed runs against the first run.

    $ python -m bench.bench_rescore            # after `make demo` (uses data/processed, models/checkpoints)

Runs efficient_tracin once into a fresh folder (factor pass + scores), then the same command with
--top_k 20, with --test_subset 200 and with one checkpoint fewer into that folder (each should
run no forward pass), and each of those again into a folder of its own from scratch, and prints
a table: seconds, forward batches run, share of the first run's time, and the largest difference
from the fresh run (top-k values, self-influence) with the share of equal top-k indices.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lib.checkpoints import find_checkpoints
from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job
from TracIn.core.results import load_results


def tracin(args, out: Path, **settings) -> tuple[float, dict]:
    cfg = TracInConfig(data_dir=args.data_dir, checkpoint_dir=args.checkpoint_dir, output_dir=str(out),
                       num_workers=args.num_workers, **settings)
    t0 = time.time()
    summary = tracin_job(cfg)
    return time.time() - t0, summary


def compare(a: Path, b: Path) -> tuple[float, float]:
    ra, rb = load_results(a), load_results(b)
    diff = max(float(np.max(np.abs(np.asarray(ra[k]) - np.asarray(rb[k]))))
               for k in ("top_k_influences_values", "top_k_opponents_values", "self_influence"))
    same = np.mean([np.mean(np.asarray(ra[k]) == np.asarray(rb[k])) for k in ("top_k_influences_indices", "top_k_opponents_indices")])
    return diff, float(same)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--checkpoint_dir", default="models/checkpoints", help="checkpoints (default models/checkpoints)")
    p.add_argument("--num_workers", type=int, default=2, help="loader workers (default 2)")
    args = p.parse_args()
    ckpts = [str(c) for c in find_checkpoints(args.checkpoint_dir)]
    work = Path(tempfile.mkdtemp(prefix="bench_rescore-"))
    try:
        first_s, first = tracin(args, work / "cached")
        rows = [("first run (factors + scores)", first_s, first["batches_computed"], 1.0, None)]
        for label, extra in (("--top_k 20", {"top_k": 20}), ("--test_subset 200", {"test_subset": 200}),
                             ("one checkpoint fewer", {"checkpoints": ckpts[1:]})):
            s, summary = tracin(args, work / "cached", **extra)
            tracin(args, work / f"fresh{len(rows)}", **extra)
            rows.append((label, s, summary["batches_computed"], s / first_s, compare(work / "cached", work / f"fresh{len(rows)}")))
        print(f"efficient_tracin on {args.data_dir}: {first['n_test']} test x {first['n_train']} train, {first['n_checkpoints']} checkpoints")
        print(f"| {'run (same --output_dir)':<30} | {'seconds':>8} | {'forward batches (train, test)':>30} | {'x first':>7} | "
              f"{'max abs diff vs fresh':>21} | {'equal top-k indices':>18} |")
        for label, s, batches, frac, cmp in rows:
            b = f"{batches['train']}, {batches['test']}"
            d, same = (f"{cmp[0]:.3g}", f"{cmp[1]:.4f}") if cmp else ("-", "-")
            print(f"| {label:<30} | {s:>8.1f} | {b:>30} | {frac:>7.3f} | {d:>21} | {same:>18} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
