"""The peers with the same K models as bench_ensemble's ensembles, on the same full-retrain LDS records and test images:
the peer rows of docs/ensembles.md.

    $ .venv/bin/pip install -r requirements-bench.txt      # traker, kronfluence; never part of `make setup`
    $ python -m bench.bench_ensemble                        # the members, the ensembles' LDS and the shared records
    $ python -m bench.bench_ensemble_peers                  # about 110 min on 2 cores (most of it traker's featurizing)

For K = 1, 2, 4, 8 (the original run and members 1..7, each its last checkpoint):
- trak (traker): TRAK's own ensemble. One TRAKer (grad_wrt fc, proj_dim 2048, float32, the CPU projector) featurizes
  and scores all 8 models once; `finalize_scores(model_ids=first K)` is then traker's K-model ensemble (its per-model
  scores averaged and its out-to-loss term averaged over the same models). lambda_reg 100 x the mean eigenvalue of
  X^T X: what a sweep over 1e-4..100 chose on these records for K = 1 on digits (and bench_peers' on both data
  sets), fixed because each value re-finalises every model (about 40 s per value and model here).
- ekfac_last (kronfluence): kronfluence's EK-FAC on fc of each member's last checkpoint (the measurement its margin,
  the loss cross-entropy with sampled labels: the true Fisher), dense scores per member averaged over the first K; its
  damping swept over DAMPINGS x each member's mean corrected eigenvalue and chosen on the same selection subsets as
  every method here.
LDS on the same 36 reported subsets, 95% bootstrap interval. Scores are kept in bench/results/ensemble/<set>/peers/,
keyed by the models' files, so a rerun only re-reads them.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lib.checkpoints import find_checkpoints, load_checkpoint, model_from_checkpoint
from lib.data_utils import list_split
from lib.files import file_sha256
from bench.bench_ensemble import KS, ROOT
from bench.bench_peers import kronfluence_scores, records, tensors
from TracIn.experiments import lds_score

TRAK_RELATIVE = 100.0
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # x the member's mean corrected eigenvalue


def trak_ensembles(ckpts, ks, x_tr, y_tr, x_te, y_te, work: Path) -> tuple[dict, float]:
    """traker's ensemble of the first K models for every K in ks: ({K: (n_test, n_train) scores}, seconds for all)."""
    import torch
    from trak import TRAKer

    t0 = time.time()
    models = [model_from_checkpoint(c).eval() for c in ckpts]
    # TRAKer loads every checkpoint into the model it is given: its own copy, so that models[0] keeps its weights
    # (handing it models[0] itself scored model 0's test images with the last model's weights)
    traker = TRAKer(model=copy.deepcopy(models[0]), task="image_classification", train_set_size=len(x_tr), save_dir=str(work / "trak"),
                    device="cpu", proj_dim=2048, use_half_precision=False, grad_wrt=["fc.weight", "fc.bias"],
                    logging_level=logging.ERROR)
    grams = []
    for mid, m in enumerate(models):
        traker.load_checkpoint(m.state_dict(), model_id=mid)
        for b in range(0, len(x_tr), 64):
            traker.featurize(batch=(x_tr[b:b + 64], y_tr[b:b + 64]), num_samples=len(x_tr[b:b + 64]))
        traker.saver.load_current_store(mid)
        g = torch.as_tensor(np.asarray(traker.saver.current_store["grads"]), dtype=torch.float32)
        grams.append(float(torch.diagonal(g.T @ g).mean()))
    traker.score_computer.lambda_reg = TRAK_RELATIVE * float(np.mean(grams))
    traker.finalize_features()
    for mid, m in enumerate(models):
        traker.start_scoring_checkpoint(exp_name="ens", checkpoint=m.state_dict(), model_id=mid, num_targets=len(x_te))
        for b in range(0, len(x_te), 64):
            traker.score(batch=(x_te[b:b + 64], y_te[b:b + 64]), num_samples=len(x_te[b:b + 64]))
    out = {k: np.asarray(traker.finalize_scores(exp_name="ens", model_ids=list(range(k)))).T.copy() for k in ks}
    return out, time.time() - t0


def cached(path: Path, key: str, compute):
    """compute() -> (dict of arrays, seconds), kept in `path` under `key` (the models' and test images' identity)."""
    if path.exists():
        with np.load(path) as z:
            if str(z["key"]) == key:
                return {n: z[n] for n in z.files if n not in ("key", "seconds")}, float(z["seconds"])
    arrays, seconds = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, key=np.array(key), seconds=np.array(seconds), **arrays)
    return arrays, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "digits"])
    p.add_argument("--ks", nargs="+", type=int, default=list(KS), help="ensemble sizes (default 1 2 4 8)")
    p.add_argument("--peers", nargs="+", default=["kronfluence", "traker"], choices=["kronfluence", "traker"])
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
        folders = [cell / "ckpt"] + [cell / "members" / f"member_{k}" / "checkpoints" for k in range(1, max(args.ks))]
        paths = [find_checkpoints(f)[-1] for f in folders]
        lasts = [load_checkpoint(p) for p in paths]
        shas = [file_sha256(p)[:16] for p in paths]
        x_tr, y_tr = tensors(train_list, np.arange(len(train_list.paths)), lasts[0])
        x_te, y_te = tensors(test_list, group, lasts[0])
        masks, margins = records(cell / "lds", len(train_list.paths), group, ours[1]["num_subsets"])
        test_key = f"{group.tolist()}"
        if "kronfluence" in args.peers:
            members, seconds = [], []
            for sha, ckpt in zip(shas, lasts):
                def compute(ckpt=ckpt):
                    with tempfile.TemporaryDirectory() as work:
                        scores, sec = kronfluence_scores(ckpt, x_tr, y_tr, x_te, y_te, Path(work), relative=DAMPINGS)
                    return {f"{rel!r}": s for rel, s in scores.items()}, sec
                scores, sec = cached(cell / "peers" / f"kronfluence-{sha}.npz", f"{sha}-{test_key}", compute)
                members.append({float(r): s for r, s in scores.items()})
                seconds.append(sec)
            for k in args.ks:
                mean = {rel: np.mean([m[rel].astype(np.float64) for m in members[:k]], axis=0) for rel in DAMPINGS}
                r = lds_score.choose_damping(mean, masks, margins, ours[k]["select_subsets"], 1000, 0)
                table[(name, "ekfac_last (kronfluence), members' mean", k)] = {
                    "lds": r["lds"], "ci95": r["ci95"], "damping": r["damping"], "seconds": float(sum(seconds[:k]))}
        if "traker" in args.peers:
            key = "-".join(shas[:max(args.ks)]) + f"-{test_key}-{TRAK_RELATIVE}-own-model-copy"

            def compute_trak():
                with tempfile.TemporaryDirectory() as work:
                    scores, sec = trak_ensembles(lasts[:max(args.ks)], args.ks, x_tr, y_tr, x_te, y_te, Path(work))
                return {f"k{k}": s for k, s in scores.items()}, sec

            scores, sec = cached(cell / "peers" / "traker-ensembles.npz", key, compute_trak)
            for k in args.ks:
                r = lds_score.choose_damping({TRAK_RELATIVE: scores[f"k{k}"]}, masks, margins, ours[k]["select_subsets"], 1000, 0)
                table[(name, "trak (traker), TRAK's ensemble", k)] = {"lds": r["lds"], "ci95": r["ci95"],
                                                                      "damping": r["damping"], "seconds_all_ks": sec}
        for (n, method, k), r in table.items():
            if n == name:
                print(f"{name} K={k} {method}: {r['lds']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                      f"(regulariser {r['damping']:g} x mean eigenvalue)", flush=True)
    saved = json.loads((ROOT / "peers.json").read_text()) if (ROOT / "peers.json").exists() else {}
    (ROOT / "peers.json").write_text(json.dumps({**saved, **{f"{n} {m} K={k}": v for (n, m, k), v in table.items()}}, indent=2))
    for name in args.sets:
        for method in dict.fromkeys(m for (n, m, _) in table if n == name):
            cells = [table[(name, method, k)] for k in args.ks]
            print(f"{name}: | {method} | " + " | ".join(f"{c['lds']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
                                                          for c in cells) + " |")


if __name__ == "__main__":
    main()
