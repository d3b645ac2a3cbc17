"""How high can a full-retrain LDS go? The retrain-seed ceiling of bench_ensemble's records.

    $ python -m bench.bench_ensemble                 # the records (one retrain per subset, seed s0 + 1000 j)
    $ python -m bench.bench_lds_ceiling              # one more retrain per reported subset (seed + 1): ~15 min MNIST, ~8 digits

The LDS correlates, per test image and over the reported subsets, a method's predicted margin with the margin of ONE
model retrained on the subset. That margin is the subset's effect plus the retrain seed's noise, which no attribution
of the subset can predict. Here every reported subset is retrained once more with another seed (the same settings,
data and subset; `seed + 1000 j + 1`, the second model `TracIn.lds --models_per_subset 2` would train) and:
- `seed vs seed`: the mean over test images of the Spearman correlation between the two seeds' margins: the LDS of a
  predictor that knows everything about the subset except the seed (a second retrain), the reliability r;
- `ceiling ~ sqrt(r)`: under signal + independent noise, the highest correlation any function of the subset can have
  with one seed's margin (Pearson; the Spearman figure is close for these near-normal margins);
- the best ensemble's LDS and the shipped default's, beside it, from lds-k*.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np

from bench.bench_ensemble import ROOT
from lib.data_utils import list_split
from lib.prediction import logit_figures
from TracIn.core.arguments import DAMPING
from TracIn.experiments import lds_score
from TracIn.experiments.retraining import Arm, Retrainer
from TracIn.experiments.lds_score import SubsetStore

TOOL = "lds"


def second_seed_margins(cell, store: dict, ours: dict, only_done: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """(reported subsets, n_test) margins of seed 0 (the records) and of seed 1 (retrained now, kept in ceiling/);
    only_done: no retraining, the reported subsets whose second seed is already there."""
    data = store["data"]["data_dir"]
    train_list, test_list = list_split(data, "train"), list_split(data, "test")
    records = SubsetStore(cell / "lds", store)
    out = cell / "lds" / "ceiling"
    out.mkdir(exist_ok=True)
    retrainer = Retrainer("full", store["settings"], data, train_list, np.asarray(store["excluded"], dtype=np.int64),
                          out / "work", cell / "lds", TOOL, 2, "cpu")
    m0, m1, seconds = [], [], 0.0
    for j in range(ours["select_subsets"], ours["num_subsets"]):
        rec = records.load(j)
        saved = out / f"subset_{j:05d}_seed1.npy"
        if only_done and not saved.exists():
            continue
        if not saved.exists():
            t0 = time.time()
            keep = np.zeros(len(train_list.paths), dtype=bool)
            keep[rec["train_idx"]] = True
            arm = Arm(f"subset_{j:05d}_seed1", np.flatnonzero(~keep), int(store["settings"]["seed"]) + 1000 * j + 1)
            logits = retrainer.test_logits(arm, keep_folder=False)
            np.save(saved, logit_figures(logits[None], test_list.labels)[1][0])
            seconds += time.time() - t0
        m0.append(rec["margin"])
        m1.append(np.load(saved))
    return np.asarray(m0), np.asarray(m1), seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["digits", "mnist"])
    p.add_argument("--only_done", action="store_true", help="no retraining: the subsets whose second seed is there")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    rows = {}
    for name in args.sets:
        cell = ROOT / name
        store = json.loads((cell / "lds" / "store.json").read_text())
        ours = json.loads((cell / "lds-k1.json").read_text())
        group = np.asarray(ours["test_group"])
        m0, m1, seconds = second_seed_margins(cell, store, ours, args.only_done)
        r = lds_score.spearman_rows(m1[:, group], m0[:, group])  # per test image, over the reported subsets
        r_mean, (lo, hi) = lds_score.nan_mean(r), lds_score.bootstrap_interval(r, 1000, 0)
        best = max(((f"K={k} {m}", v["lds"]) for k in (1, 2, 4, 8, 16, 32) if (cell / f"lds-k{k}.json").exists()
                    for m, v in json.loads((cell / f"lds-k{k}.json").read_text())["methods"].items()), key=lambda x: x[1])
        default = ours["methods"]["influence_last"]["lds_at_default_damping"]
        rows[name] = {"subsets": len(m0), "seed_vs_seed": r_mean, "ci95": [lo, hi], "ceiling": float(np.sqrt(max(r_mean, 0.0))),
                      "best_ensemble": best, "default_one_run": default, "retrain_seconds_now": seconds}
        print(f"{name} ({len(m0)} reported subsets): seed vs seed {r_mean:.3f} [{lo:.3f}, {hi:.3f}], ceiling ~ {np.sqrt(max(r_mean, 0)):.3f}; best measured "
              f"{best[1]:.3f} ({best[0]}); default one run (damping {DAMPING:g}) {default:.3f}", flush=True)
    (ROOT / "ceiling.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
