"""Dropout-mask members (Deng et al. 2024's cheapest ensemble) against one run and real members, on bench_ensemble's
full-retrain LDS records: does a member that costs no training pay?

    $ python -m bench.bench_ensemble                 # the original run (results-k1), its factor cache and the records
    $ python -m bench.bench_dropout                  # a minute per set on 2 cores

Member k is the original run's last checkpoint with a fixed dropout mask m_k (rate p, entries 0 or 1 / (1 - p)) on the
fc layer's input, the same mask for training and test images: its fc factors follow from the cached ones with no
forward pass, a_k = [m_k * a, 1], logits_k = W a_k, d_k = softmax(logits_k) - onehot(y) (the cross-entropy's output
gradient). K masks make an ensemble scored like efficient_tracin --members scores one (each member its own K-FAC or
TRAK features, the scores averaged); K = 1 with p = 0 is the run itself. Every method's damping chosen on the same
selection subsets as bench_ensemble's; LDS on the same reported subsets, same 200 test images.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import torch

from bench.bench_ensemble import KS, ROOT
from bench.bench_peers import records
from lib.checkpoints import load_checkpoint
from TracIn.core.factors import ResidentFactors
from TracIn.core.methods import METHODS as REGISTRY, FactorSet
from TracIn.core.run import InfluenceRun
from TracIn.experiments import lds_score
from TracIn.experiments.lds_score import DAMPINGS

METHODS = ("influence_last", "trak")
RATES = (0.1, 0.5)


def masked(a: torch.Tensor, labels: np.ndarray, w: torch.Tensor, mask: torch.Tensor):
    """fc factors (A, D) and logits of images whose fc input is multiplied by `mask` (A holds the bias column)."""
    a = torch.cat([a[:, :-1] * mask, a[:, -1:]], dim=1)
    logits = a @ w.T
    d = torch.softmax(logits, dim=1)
    d[torch.arange(len(d)), torch.as_tensor(labels, dtype=torch.long)] -= 1.0
    return a, d, logits


def dropout_set(fs: FactorSet, w: torch.Tensor, t: int, k: int, rate: float, seed: int) -> FactorSet:
    """A FactorSet of k mask members of checkpoint t of fs (float32, as the cache holds factors)."""
    cpu = torch.device("cpu")
    tr = fs.train_view.load(t, "fc", slice(0, fs.n_train), cpu)
    te = fs.test_view.load(t, "fc", slice(0, fs.n_test), cpu)
    gen = torch.Generator().manual_seed(seed)
    tensors, logits = {}, {"train": [], "test": []}
    for j in range(k):
        keep = (torch.rand(tr[0].shape[1] - 1, generator=gen) >= rate).float() / (1.0 - rate)
        for side, (a, _), labels in (("train", tr, fs.train_labels), ("test", te, fs.test_labels)):
            am, dm, lm = masked(a, labels, w, keep)
            tensors.setdefault(side, {})[j] = (am, dm)
            logits[side].append(lm.numpy())
    views = {side: ResidentFactors({(j, "fc", kind): tensors[side][j][i] for j in range(k) for i, kind in enumerate("AD")})
             for side in ("train", "test")}
    return FactorSet(views["train"], views["test"], [1.0] * k, ["fc"], fs.train_labels, fs.test_labels, cpu,
                     np.stack(logits["train"]), np.stack(logits["test"]), block=fs.block, members=[[j] for j in range(k)])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "digits"])
    p.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    table = {}
    for name in args.sets:
        cell = ROOT / name
        ours = json.loads((cell / "lds-k1.json").read_text())
        group = np.asarray(ours["test_group"])
        run = InfluenceRun.from_results(cell / "results-k1", cell / "data")
        fs = run.group(group)
        t = run.members[0][-1]
        ckpt = load_checkpoint(run.paths[t])
        w = torch.cat([ckpt["model_state"]["fc.weight"], ckpt["model_state"]["fc.bias"][:, None]], dim=1).float()
        masks, margins = records(cell / "lds", run.n_train, group, ours["num_subsets"])
        for rate in args.rates:
            for k in KS:
                ds = dropout_set(fs, w, t, k, rate, seed=0)
                for m in METHODS:
                    scores = {lam: ds.dense(REGISTRY[m], lam) for lam in DAMPINGS}
                    r = lds_score.choose_damping(scores, masks, margins, ours["select_subsets"], 1000, 0)
                    table[f"{name} {m} p={rate} K={k}"] = {"lds": r["lds"], "ci95": r["ci95"], "damping": r["damping"]}
                    print(f"{name} {m} dropout p={rate} K={k}: {r['lds']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                          f"(damping {r['damping']:g})", flush=True)
    (ROOT / "dropout.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
