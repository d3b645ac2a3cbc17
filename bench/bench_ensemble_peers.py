"""traker (TRAK's own ensemble) with the same K models as bench_ensemble's ensembles, on the same full-retrain LDS
records and test images: the peer column of docs/ensembles.md.

    $ .venv/bin/pip install -r requirements-bench.txt      # traker; never part of `make setup`
    $ python -m bench.bench_ensemble                        # the members, the ensembles' LDS and the shared records
    $ python -m bench.bench_ensemble_peers                  # about 10 min on 2 cores

For K = 1, 2, 4, 8: traker's TRAKer (grad_wrt fc, proj_dim 2048, float32, the CPU projector) with the last checkpoint
of each of the first K members as its model ids (TRAK's ensemble of independently trained models), its own margin
output; its lambda_reg at 100 x the mean eigenvalue of X^T X: what a sweep over 1e-4..100 chose on these records for K = 1
and 2 on digits (and bench_peers' on both data sets), fixed because each value re-finalises and re-scores all K models
(about 40 s per value and model here); LDS on the same 36 reported subsets, 95% bootstrap interval.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from lib.checkpoints import find_checkpoints, load_checkpoint
from lib.data_utils import list_split
from bench.bench_ensemble import KS, ROOT
from bench.bench_peers import records, tensors, trak_scores
from TracIn.experiments import lds_score


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "digits"])
    p.add_argument("--ks", nargs="+", type=int, default=list(KS), help="ensemble sizes (default 1 2 4 8)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    table = {}
    for name in args.sets:
        cell = ROOT / name
        ours = {k: json.loads((cell / f"lds-k{k}.json").read_text()) for k in KS}
        group = np.asarray(ours[1]["test_group"])
        data = cell / "data"
        train_list, test_list = list_split(data, "train"), list_split(data, "test")
        folders = [cell / "ckpt"] + [cell / "members" / f"member_{k}" / "checkpoints" for k in range(1, max(KS))]
        lasts = [load_checkpoint(find_checkpoints(f)[-1]) for f in folders]
        x_tr, y_tr = tensors(train_list, np.arange(len(train_list.paths)), lasts[0])
        x_te, y_te = tensors(test_list, group, lasts[0])
        masks, margins = records(cell / "lds", len(train_list.paths), group, ours[1]["num_subsets"])
        for k in args.ks:
            with tempfile.TemporaryDirectory() as work:
                scores, seconds = trak_scores(lasts[:k], x_tr, y_tr, x_te, y_te, Path(work), relative=(100.0,))
            r = lds_score.choose_damping(scores, masks, margins, ours[k]["select_subsets"], 1000, 0)
            table[(name, k)] = {"lds": r["lds"], "ci95": r["ci95"], "damping": r["damping"], "seconds": seconds}
            print(f"{name} K={k} trak (traker): {r['lds']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                  f"(lambda {r['damping']:g} x mean eigenvalue, {seconds:.0f}s)", flush=True)
    saved = json.loads((ROOT / "peers.json").read_text()) if (ROOT / "peers.json").exists() else {}
    (ROOT / "peers.json").write_text(json.dumps({**saved, **{f"{n} K={k}": v for (n, k), v in table.items()}}, indent=2))
    for name in args.sets:
        print(f"\n{name}: | trak (traker), same K models | " + " | ".join(
            f"K={k} {table[(name, k)]['lds']:.3f} [{table[(name, k)]['ci95'][0]:.3f}, {table[(name, k)]['ci95'][1]:.3f}]"
            for k in args.ks) + " |")


if __name__ == "__main__":
    main()
