"""Do influence lists hold up when you retrain? Remove each method's top-k proponents of a group of
test images, retrain, and measure how the group's loss, margin and predictions change.

    $ python -m TracIn.counterfactual_check --n_test 10 --k 10 40 --seeds 3        # full retrains with train.py
    $ python -m TracIn.counterfactual_check --retrain head                          # seconds: the fc layer only
    $ python -m TracIn.counterfactual_check --test_ids 4 17 99 --methods tracin random

Methods (each gives a ranked list per test image; a group's removal set is the union of its images' top k):
- tracin: TracIn proponents as efficient_tracin.py scores them (--normalize none, the paper's);
- tracin_normalized: proponents of --normalize train (each training gradient divided by its norm per
  checkpoint);
- influence_last: proponents of --score_fn influence_last (K-FAC influence at the last checkpoint, --damping of the
  TracIn run or efficient_tracin's default);
- knn: the nearest training images by cosine of the last checkpoint's penultimate features (the fc input);
- random: k random training images of the test image's class, a new draw per training seed (the control).
The lists come from efficient_tracin.py's factor cache in results_dir (TracIn/core/run.py; no forward pass when it
is complete).

Arms: nothing removed, and each method at each k. Every arm is retrained once per training seed (the original
run's seed + 0, 1, ...), and every change is paired: the arm minus the nothing-removed arm of the same seed.
- --retrain full (default): train.py with the original run's settings (checkpoint_dir/train_args.json: initial
  weights, seed, schedule, batch size); --arch/--epochs make it cheaper and are said in the output.
- --retrain head: keeps the last checkpoint's backbone and retrains only fc from a seeded initialisation with
  the original optimiser, schedule and batch size, on the cached penultimate features (TracIn/experiments/retraining.py). It
  checks the layer TracIn scores here in seconds, but is blind to what removal would have changed in the backbone.

Writes out_dir (default results_dir/counterfactual/<retrain>)/counterfactual.json and prints, per method and
k, the mean +- standard deviation over seeds of the change in the group's mean loss and margin and of the
predictions flipped, beside the random control's. A method beats the control only when its mean loss
change exceeds the control's by more than both standard deviations.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from lib.cli import UserError, cli, nonneg_int, positive_int
from lib.devices import resolve_device
from lib.files import save_json
from lib.ownership import Owner
from lib.prediction import logit_figures
from TracIn.core.factors import choose_subset
from TracIn.core.methods import METHODS as REGISTRY
from TracIn.core.results import run_id
from TracIn.core.run_folder import record_inputs, run_folder_path, skip, tool_record
from TracIn.core.run import InfluenceRun
from TracIn.experiments.retraining import Arm, Retrainer, original_exclusions, original_settings, run_arms

log = logging.getLogger(__name__)
TOOL = "counterfactual_check"
OWNER = Owner(TOOL)  # its arms folder: new, empty or already its own; marked before any arm
METHODS = ("tracin", "tracin_normalized", "influence_last", "knn", "random")  # the registry's (TracIn/core/methods.py), then two controls


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="TracIn/results", help="efficient_tracin.py output with its factor cache (default TracIn/results)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--checkpoint_dir", default=None, help="the original run's checkpoints with train_args.json "
                                                          "(default: the folder of the checkpoints TracIn used)")
    p.add_argument("--out_dir", default=None, help="output folder (default results_dir/counterfactual/<retrain>)")
    p.add_argument("--retrain", choices=("full", "head"), default="full", help="full: train.py; head: fc only (default full)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="attribution methods (default all)")
    p.add_argument("--k", nargs="+", type=positive_int, default=[10, 40], help="proponents removed per test image (default 10 40)")
    p.add_argument("--n_test", type=positive_int, default=10, help="size of the seeded test group (default 10)")
    p.add_argument("--test_ids", nargs="+", type=nonneg_int, default=None, help="test split indices of the group (default: a seeded sample)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the test group and the random control (default 0)")
    p.add_argument("--seeds", type=positive_int, default=3, help="training seeds per arm (default 3)")
    p.add_argument("--arch", default=None, help="full retrain with this architecture (default: the original run's)")
    p.add_argument("--epochs", type=positive_int, default=None, help="retrain for this many epochs (default: the original run's)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="data loader workers (default 2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the lists
def knn_lists(run_factors: InfluenceRun, group: np.ndarray, k: int) -> np.ndarray:
    tr = torch.nn.functional.normalize(run_factors.features("train")[:, :-1], dim=1)
    te = torch.nn.functional.normalize(run_factors.features("test")[group, :-1], dim=1)
    return torch.topk(te @ tr.T, k, dim=1).indices.numpy()


def random_lists(train_labels: np.ndarray, group_labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per test image, k random training images of its class (fewer when the class has fewer)."""
    rows = []
    for c in group_labels:
        pool = np.flatnonzero(train_labels == c)
        rows.append(rng.choice(pool, size=min(k, len(pool)), replace=False))
    return rows


def removal_set(lists, k: int) -> np.ndarray:
    return np.unique(np.concatenate([np.asarray(row)[:k] for row in lists])).astype(np.int64)


# ---------------------------------------------------------------- the check
def summarize(raw: list[dict], methods, ks, n_seeds) -> dict:
    """Paired changes per (method, k): arm minus nothing-removed at the same seed, mean and std over seeds."""
    by = {(r["method"], r["k"], r["seed"]): r for r in raw}
    out = {}
    for m in methods:
        for k in ks:
            rows = [by[(m, k, s)] for s in range(n_seeds)]
            base = [by[("none", 0, s)] for s in range(n_seeds)]
            d = {"loss": [r["group_loss"] - b["group_loss"] for r, b in zip(rows, base)],
                 "margin": [r["group_margin"] - b["group_margin"] for r, b in zip(rows, base)],
                 "flips": [float(np.sum(np.asarray(r["group_pred"]) != np.asarray(b["group_pred"]))) for r, b in zip(rows, base)],
                 "rest_accuracy": [r["rest_accuracy"] - b["rest_accuracy"] for r, b in zip(rows, base)]}
            cell = {"removed": float(np.mean([r["removed"] for r in rows]))}
            for name, v in d.items():
                v = np.asarray(v, dtype=np.float64)
                cell[f"d_{name}_mean"] = float(v.mean())
                cell[f"d_{name}_std"] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
                cell[f"d_{name}_per_seed"] = v.tolist()
            out[f"{m}@{k}"] = cell
    if "random" in methods:
        for m in methods:
            for k in ks:
                c, r = out[f"{m}@{k}"], out[f"random@{k}"]
                gap = c["d_loss_mean"] - r["d_loss_mean"]
                c["loss_gap_vs_random"] = gap
                c["beats_random"] = bool(m != "random" and gap > max(c["d_loss_std"], r["d_loss_std"]))
    return out


def check(args) -> dict:
    t_start = time.time()
    device = resolve_device(args.device)
    if args.retrain == "head" and (args.arch or args.epochs):
        raise UserError("--arch and --epochs change a full retrain; --retrain head keeps the original run's fc and schedule")
    run_factors = InfluenceRun.from_results(args.results_dir, args.data_dir, device, args.num_workers)
    run_factors.require_full("the check")
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(run_factors.paths[0]).parent
    settings = original_settings(ckpt_dir, args.arch, args.epochs)
    inputs = {"tracin_run": run_id(run_factors.record)}
    if not args.out_dir:  # the default folder sits in the results folder, which a new TracIn run clears of it
        record_inputs(OWNER.folder(Path(args.results_dir) / "counterfactual", "--results_dir").fill().path, TOOL, inputs)
    out = OWNER.folder(Path(args.out_dir or Path(args.results_dir) / "counterfactual" / args.retrain), "--out_dir").fill().path
    record_inputs(out, TOOL, inputs)
    already = original_exclusions(ckpt_dir, run_factors.train_list)  # left out of the original run: out of every arm too

    train_labels, test_labels = run_factors.train_list.labels, run_factors.test_list.labels
    if args.test_ids:
        bad = [i for i in args.test_ids if i >= run_factors.n_test]
        if bad:
            raise UserError(f"--test_ids {' '.join(map(str, bad))}: the test split has {run_factors.n_test} images (0..{run_factors.n_test - 1})")
        group = np.unique(np.asarray(args.test_ids, dtype=np.int64))
    else:
        group = choose_subset(run_factors.n_test, min(args.n_test, run_factors.n_test), args.seed)
    ks = sorted(set(args.k))
    per_class = np.bincount(train_labels, minlength=len(run_factors.train_list.class_names))
    if ks[-1] > per_class[test_labels[group]].min():
        raise UserError(f"--k {ks[-1]} is more than the {per_class[test_labels[group]].min()} training images of a group "
                        "image's class; lower --k")
    methods = [m for m in METHODS if m in args.methods]
    lists = {}
    for name in (m for m in methods if m in REGISTRY):  # ranked as efficient_tracin ships the method
        lists[name] = run_factors.recompute_proponents(group, ks[-1], score_fn=REGISTRY[name].score_fn, normalize=REGISTRY[name].normalize)
    if "knn" in methods:
        lists["knn"] = knn_lists(run_factors, group, ks[-1])
    rest = np.setdiff1d(np.arange(run_factors.n_test), group)
    features = (run_factors.features("train"), run_factors.features("test")) if args.retrain == "head" else None
    retrainer = Retrainer(args.retrain, settings, args.data_dir, run_factors.train_list, already, out / "arms", out, TOOL,
                          args.num_workers, args.device, features)

    arms = []
    for s in range(args.seeds):
        seed = int(settings["seed"]) + s
        for m, k in [("none", 0)] + [(m, k) for m in methods for k in ks]:
            if m == "none":
                drop = np.zeros(0, dtype=np.int64)
            elif m == "random":
                rng = np.random.default_rng([args.seed, s, k])
                drop = removal_set(random_lists(train_labels, test_labels[group], k, rng), k)
            else:
                drop = removal_set(lists[m], k)
            arms.append(Arm(f"{m}-k{k}-seed{seed}", drop, seed, {"method": m, "k": k, "seed": s, "train_seed": seed}))

    def measure(arm: Arm) -> dict:
        logits = retrainer.test_logits(arm)
        loss, margin, _ = logit_figures(logits[None], test_labels)
        pred = logits.argmax(1)
        return {"removed": int(len(retrainer.left_out(arm))),
                "group_loss": float(loss[0, group].mean()), "group_margin": float(margin[0, group].mean()),
                "group_pred": pred[group].tolist(),
                "group_accuracy": float((pred[group] == test_labels[group]).mean()),
                "rest_accuracy": float((pred[rest] == test_labels[rest]).mean()) if len(rest) else float("nan")}

    raw = run_arms(arms, measure, lambda row: f"removed {row['removed']:>4}, group loss {row['group_loss']:.4f}, "
                                              f"margin {row['group_margin']:+.3f}, accuracy {row['group_accuracy']:.2f}")
    summary = summarize(raw, methods, ks, args.seeds)
    result = {
        "retrain": args.retrain, "settings": settings, "methods": methods, "k": ks, "seeds": args.seeds,
        "group": group.tolist(), "group_labels": test_labels[group].tolist(), "n_train": run_factors.n_train,
        "results_dir": str(args.results_dir), "tracin_run": run_id(run_factors.record), "originally_excluded": int(len(already)),
        "tracin_layers": run_factors.layers, "summary": summary, "arms": raw,
        "lists": {m: v.tolist() for m, v in lists.items()}, "seconds": time.time() - t_start,
    }
    save_json(out / "counterfactual.json", result)
    return result


def load(results, notes: list[str] | None = None, folder=None) -> dict[str, dict] | None:
    """The counterfactual checks of a run (a TracInResults or its folder; `folder`: another than run/counterfactual),
    by --retrain: each counterfactual.json of this TracIn run. None at all, or a stale one: one UserError
    line, or with `notes` a line there and the others returned; an unreadable one: refused."""
    folder = Path(folder) if folder is not None else run_folder_path(results) / "counterfactual"
    paths = sorted(folder.glob("*/counterfactual.json"))
    if not paths:
        skip(f"no counterfactual check in {folder}: run python -m TracIn.counterfactual_check", notes)
    found = {p.parent.name: tool_record(results, "", "", notes, p, "rerun python -m TracIn.counterfactual_check") for p in paths}
    return {k: v for k, v in found.items() if v is not None}


def table(result: dict) -> list[str]:
    s = result["summary"]
    lines = [f"{'method':<18}{'k':>4}{'removed':>9}  {'d loss':>16}  {'d margin':>16}  {'flips':>11}  "
             f"{'d rest acc':>10}  {'vs random':>9}"]
    for m in result["methods"]:
        for k in result["k"]:
            c = s[f"{m}@{k}"]
            verdict = "" if m == "random" or "beats_random" not in c else ("beats" if c["beats_random"] else "no")
            lines.append(f"{m:<18}{k:>4}{c['removed']:>9.0f}  {c['d_loss_mean']:>+8.3f} +- {c['d_loss_std']:<5.3f}  "
                         f"{c['d_margin_mean']:>+8.3f} +- {c['d_margin_std']:<5.3f}  {c['d_flips_mean']:>4.1f} +- {c['d_flips_std']:<4.1f}  "
                         f"{c['d_rest_accuracy_mean']:>+10.4f}  {verdict:>9}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    result = check(args)
    st = result["settings"]
    how = "fc only, on the last checkpoint's features" if result["retrain"] == "head" else f"{st['arch']}, {st['epochs']} epochs"
    log.info(f"counterfactual check: {len(result['group'])} test images, retrain {result['retrain']} ({how}), "
             f"{result['seeds']} seeds per arm; changes are arm minus nothing-removed at the same seed, mean +- std over seeds")
    for line in table(result):
        log.info(line)
    return 0


if __name__ == "__main__":
    cli(main)
