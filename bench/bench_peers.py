"""TRAK (traker 0.3.2) and kronfluence (1.0.1) beside this repo's scores, on the same models, data, test images and
retrained subsets: one LDS table, head and full retraining, with the seconds each method took.

    $ .venv/bin/pip install -r requirements-bench.txt     # the peers; never part of `make setup`
    $ python -m bench.bench_lds                            # the head-LDS records (and the runs) this bench reuses
    $ python -m TracIn.lds --retrain full ...              # the full-LDS records (docs/lds.md says how they were made)
    $ python -m bench.bench_peers                          # about 15 min on 2 cores

Cells: the resnet18-e2 runs of bench_lds (MNIST and scikit-learn digits, 10% label noise, ResNet18 2 epochs, a
checkpoint after each). Every method scores the fc layer only (as this repo's methods do at the default --layers fc):
- trak: traker's TRAKer(grad_wrt=fc, proj_dim 2048, BasicProjector on the CPU, float32), both checkpoints as its
  ensemble (model ids), its own margin output function;
- kronfluence_ekfac: kronfluence's EK-FAC on fc of the last checkpoint (the measurement: the margin, as in its
  examples; the loss: cross-entropy with sampled labels for the true Fisher);
each with its regulariser (traker's lambda_reg, kronfluence's damping_factor) swept over orders of magnitude and
chosen on the same held-apart subsets as this repo's dampings (the first quarter), then LDS on the reported ones.
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
import torch
import torch.nn.functional as F

from lib.checkpoints import load_checkpoint, model_from_checkpoint
from lib.data_utils import ImageListDataset, eval_transform, list_split
from TracIn.core.results import load_results
from TracIn.experiments import lds_score

ROOT = Path("bench/results/lds")
DATA = {"mnist": "bench/results/mislabel/mnist-uniform-10-resnet50-e4/data",
        "digits": "bench/results/mislabel/digits-uniform-10-resnet50-e4/data"}
RELATIVE = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # x the mean eigenvalue (TRAK: of X^T X; kronfluence: its own)


def tensors(listing, ids, ckpt) -> tuple[torch.Tensor, torch.Tensor]:
    ds = ImageListDataset(listing, eval_transform(ckpt), ids)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])


def records(store: Path, n_train: int, group: np.ndarray, num_subsets: int):
    recs = [dict(np.load(store / "subsets" / f"subset_{j:05d}.npz")) for j in range(num_subsets)]
    return lds_score.records_matrices(recs, n_train, group)


def trak_scores(ckpts, x_tr, y_tr, x_te, y_te, work: Path, relative=RELATIVE) -> tuple[dict, float]:
    from trak import TRAKer

    t0 = time.time()
    models = [model_from_checkpoint(c).eval() for c in ckpts]
    # TRAKer loads every checkpoint into the model it is given: its own copy, so that models[0] keeps its weights
    traker = TRAKer(model=copy.deepcopy(models[0]), task="image_classification", train_set_size=len(x_tr), save_dir=str(work / "trak"),
                    device="cpu", proj_dim=2048, use_half_precision=False, grad_wrt=["fc.weight", "fc.bias"],
                    logging_level=logging.ERROR)
    for mid, m in enumerate(models):
        traker.load_checkpoint(m.state_dict(), model_id=mid)
        for b in range(0, len(x_tr), 64):
            traker.featurize(batch=(x_tr[b:b + 64], y_tr[b:b + 64]), num_samples=len(x_tr[b:b + 64]))
    t_features = time.time() - t0
    grams = []
    for mid in range(len(models)):
        traker.saver.load_current_store(mid)
        g = torch.as_tensor(np.asarray(traker.saver.current_store["grads"]), dtype=torch.float32)
        grams.append(float(torch.diagonal(g.T @ g).mean()))
    out, seconds = {}, {}
    for rel in relative:
        t1 = time.time()
        traker.score_computer.lambda_reg = rel * float(np.mean(grams))
        for mid in range(len(models)):  # re-finalise with this regulariser
            traker.saver.model_ids[mid]["is_finalized"] = 0
        traker.finalize_features()
        for mid, m in enumerate(models):
            traker.start_scoring_checkpoint(exp_name=f"lam{rel:g}", checkpoint=m.state_dict(), model_id=mid, num_targets=len(x_te))
            for b in range(0, len(x_te), 64):
                traker.score(batch=(x_te[b:b + 64], y_te[b:b + 64]), num_samples=len(x_te[b:b + 64]))
        out[rel] = np.asarray(traker.finalize_scores(exp_name=f"lam{rel:g}")).T  # (n_test, n_train)
        seconds[rel] = time.time() - t1
    return out, t_features + float(np.mean(list(seconds.values())))


def kronfluence_scores(ckpt, x_tr, y_tr, x_te, y_te, work: Path, relative=RELATIVE) -> tuple[dict, float]:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # labels drawn from the model: the true Fisher
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            logits = model(x)
            rows = torch.arange(len(y))
            correct = logits[rows, y]
            other = logits.clone()
            other[rows, y] = -torch.inf
            return -(correct - other.logsumexp(-1)).sum()

        def get_influence_tracked_modules(self):
            return ["fc"]

    t0 = time.time()
    task = Classification()
    model = prepare_model(model_from_checkpoint(ckpt).eval(), task)
    analyzer = Analyzer(analysis_name="peers", model=model, task=task, cpu=True, output_dir=str(work / "kronfluence"),
                        disable_tqdm=True)
    train, test = torch.utils.data.TensorDataset(x_tr, y_tr), torch.utils.data.TensorDataset(x_te, y_te)
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train, per_device_batch_size=64,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    t_factors = time.time() - t0
    out, seconds = {}, {}
    lam = analyzer.load_lambda_matrices("ekfac")  # EK-FAC's corrected eigenvalues, summed, and how many examples
    mean_eig = float(np.mean([(lam["lambda_matrix"][m] / lam["num_lambda_processed"][m]).mean().item() for m in lam["lambda_matrix"]]))
    for rel in relative:
        t1 = time.time()
        damping = rel * mean_eig
        analyzer.compute_pairwise_scores(scores_name=f"lam{rel:g}", factors_name="ekfac", query_dataset=test, train_dataset=train,
                                         per_device_query_batch_size=len(x_te), per_device_train_batch_size=64,
                                         score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        out[rel] = analyzer.load_pairwise_scores(f"lam{rel:g}")["all_modules"].numpy()
        seconds[rel] = time.time() - t1
    return out, t_factors + float(np.mean(list(seconds.values())))


def save_peers(path: Path, key: str, peers: dict) -> None:
    arrays = {f"{m}|{rel!r}": s for m, (scores, _) in peers.items() for rel, s in scores.items()}
    np.savez(path, key=np.array(key), seconds=np.array(json.dumps({m: sec for m, (_, sec) in peers.items()})), **arrays)


def load_peers(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    with np.load(path) as z:
        if str(z["key"]) != key:
            return None
        seconds = json.loads(str(z["seconds"]))
        peers = {m: ({}, sec) for m, sec in seconds.items()}
        for name in z.files:
            if "|" in name:
                m, rel = name.split("|")
                peers[m][0][float(rel)] = z[name]
    return peers


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "digits"])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    table = {}
    for name in args.sets:
        results = ROOT / f"{name}-resnet18-e2-run" / "results"
        run = load_results(results, data_dir=DATA[name])
        ckpts = [load_checkpoint(c["path"]) for c in run.record["checkpoints"]]
        train_list, test_list = list_split(DATA[name], "train"), list_split(DATA[name], "test")
        stores = {kind: store for kind, store in (("head", ROOT / f"{name}-resnet18-e2"), ("full", ROOT / f"{name}-resnet18-e2-full"))
                  if (store / "lds.json").exists()}
        ours = {kind: json.loads((store / "lds.json").read_text()) for kind, store in stores.items()}
        group = np.asarray(next(iter(ours.values()))["test_group"])
        assert all(o["test_group"] == group.tolist() for o in ours.values()), "the stores were scored on other test images"
        x_tr, y_tr = tensors(train_list, np.arange(len(train_list.paths)), ckpts[-1])
        x_te, y_te = tensors(test_list, group, ckpts[-1])
        saved = ROOT / f"peers-{name}.npz"  # the peers' scores per regulariser, keyed by the run and the test images
        key = f"{run.record['identity']['checkpoint_sha256']}-{group.tolist()}-own-model-copy"
        peers = load_peers(saved, key)
        if peers is None:
            with tempfile.TemporaryDirectory() as work:
                peers = {"trak (traker)": trak_scores(ckpts, x_tr, y_tr, x_te, y_te, Path(work)),
                         "ekfac_last (kronfluence)": kronfluence_scores(ckpts[-1], x_tr, y_tr, x_te, y_te, Path(work))}
            save_peers(saved, key, peers)
        for kind, store in stores.items():
            masks, margins = records(store, len(train_list.paths), group, ours[kind]["num_subsets"])
            cell = {m: {"lds": r["lds"], "ci95": r["ci95"], "damping": r["damping"]} for m, r in ours[kind]["methods"].items()}
            for method, (scores, seconds) in peers.items():
                r = lds_score.choose_damping(scores, masks, margins, ours[kind]["select_subsets"], 1000, 0)
                cell[method] = {"lds": r["lds"], "ci95": r["ci95"], "damping": r["damping"], "seconds": seconds, "sweep": r["sweep"]}
                print(f"{name} {kind} {method}: {r['lds']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                      f"(regulariser {r['damping']:g} x mean eigenvalue, {seconds:.0f}s)", flush=True)
            table[f"{name} {kind}"] = cell
    old = json.loads((ROOT / "peers.json").read_text()) if (ROOT / "peers.json").exists() else {}
    (ROOT / "peers.json").write_text(json.dumps({**old, **table}, indent=2))
    cols = list(table)
    methods = list(dict.fromkeys(m for c in table.values() for m in c))
    print("\n| method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for m in methods:
        cells = []
        for c in cols:
            r = table[c].get(m)
            cells.append("-" if r is None else f"{r['lds']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
