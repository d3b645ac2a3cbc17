"""The cost of the factor cache's checksums: computed on write, verified on open, against one read of the same rows.

    $ .venv/bin/python bench/bench_cache_checks.py                             # the demo's cache: ResNet50 fc, 4 checkpoints
    $ .venv/bin/python bench/bench_cache_checks.py --n_train 20000 --n_ckpt 5  # an Animals-10-sized one

A cache of random factors shaped as the run's (A: fc input + 1, D: classes, logits) is written through
CheckpointFactors.write, then opened again (the size and checksum checks of every claimed row), and its rows read once
in full, as the scoring pass reads them; prints seconds and GB/s of each. The page cache is warm (the rows were just
written), as it is when a re-score follows a run.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_train", type=int, default=3500, help="rows of the training cache (default 3500, the demo's)")
    p.add_argument("--n_ckpt", type=int, default=4, help="checkpoints (default 4, the demo's)")
    p.add_argument("--a_dim", type=int, default=2049, help="fc inputs + 1 (default 2049, ResNet50)")
    p.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    a = p.parse_args()
    from TracIn.core.factors import CheckpointFactors, row_sums

    dims = {"fc": (a.a_dim, a.classes)}
    rng = np.random.default_rng(0)
    gb = a.n_ckpt * a.n_train * 4 * (a.a_dim + 2 * a.classes) / 1e9
    with tempfile.TemporaryDirectory() as d:
        roots = [Path(d) / f"ckpt{t}" for t in range(a.n_ckpt)]
        t0 = time.perf_counter()
        hashing = 0.0
        for root in roots:
            c = CheckpointFactors(root, a.n_train, dims, a.classes, {"n": a.n_train}, Path(d))
            for r0 in range(0, a.n_train, 256):
                rows = np.arange(r0, min(r0 + 256, a.n_train))
                x = {"fc": (torch.from_numpy(rng.standard_normal((len(rows), a.a_dim), dtype=np.float32)),
                            torch.from_numpy(rng.standard_normal((len(rows), a.classes), dtype=np.float32)))}
                logits = torch.from_numpy(rng.standard_normal((len(rows), a.classes), dtype=np.float32))
                h0 = time.perf_counter()  # the checksums write() computes, timed apart
                for block in (x["fc"][0], x["fc"][1], logits):
                    row_sums(block.numpy())
                hashing += time.perf_counter() - h0
                c.write(rows, x, logits)
            c.sync()
        write_s = time.perf_counter() - t0 - hashing  # without the second hashing above
        t0 = time.perf_counter()
        caches = [CheckpointFactors(root, a.n_train, dims, a.classes, {"n": a.n_train}, Path(d)) for root in roots]
        open_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        total = sum(float(np.asarray(arr).sum(dtype=np.float64)) for c in caches for arr in [*c.arrays.values(), c.logits])
        read_s = time.perf_counter() - t0
    print(f"cache: {a.n_ckpt} checkpoints x {a.n_train} rows x ({a.a_dim} + {a.classes} + {a.classes}) float32 = {gb:.3f} GB")
    print(f"{'step':<44}{'seconds':>9}{'GB/s':>8}")
    print(f"{'write (random factors + checksums), total':<44}{write_s:>9.3f}{gb / write_s:>8.2f}")
    print(f"{'  of which the row checksums on write':<44}{hashing:>9.3f}{gb / hashing:>8.2f}")
    print(f"{'open: size + checksum of every claimed row':<44}{open_s:>9.3f}{gb / open_s:>8.2f}")
    print(f"{'one full read of the rows (the scoring pass)':<44}{read_s:>9.3f}{gb / read_s:>8.2f}  ({total:.1f})")


if __name__ == "__main__":
    main()
