"""Linear datamodeling score (LDS): how well a method's scores predict what retraining on random subsets does.

    $ python -m TracIn.lds                                   # fc retrained on 200 random halves (seconds each)
    $ python -m TracIn.lds --num_subsets 400 --n_test 300    # more subsets and test images; earlier records are reused

LDS (Park et al., "TRAK", ICML 2023, eq. 4): draw random subsets S_1..S_m of the training set (--fraction of it),
retrain on each, and record every test image's margin f(x; S_j) (given-label logit minus the largest other).
A method's scores tau(x, z) predict f(x; S_j) by sum_{z in S_j} tau(x, z); its LDS for test image x is the
Spearman correlation over j between prediction and margin, averaged over the test images (with a bootstrap
interval over test images).

--retrain head: the fc layer retrained on the last checkpoint's cached features with the original run's optimiser,
schedule, batch size and epochs (TracIn/experiments/retraining.py, through training.fit), so 200 subsets take minutes on a CPU.
--retrain full: train.py on each subset with the original run's settings (--arch/--epochs make it cheaper, and are
part of the store's identity), its last checkpoint's test margins recorded; 50 subsets by default. Each subset is one record in out_dir/subsets/ (written atomically, keyed by the TracIn
run and the subset settings): a killed run continues where it stopped, and any scoring method, new or old, is
evaluated against the same retrains without retraining. The original run's exclusions stay out of every subset.

Methods, all from the TracIn run's factor cache (no forward pass), are those of the registry (TracIn/core/methods.py), each
scored as the dense matrix of the very views efficient_tracin streams for it:
- tracin: sum_t lr_t <g_t(x), g_t(z)> (the paper), tracin_normalized: training gradients of unit norm per checkpoint,
  tracin_last: the last checkpoint's <g(x), g(z)> alone (what influence_last becomes without curvature);
- influence: g(x)^T (H_t + lambda)^{-1} g(z) summed over checkpoints with lr_t, H_t the K-FAC curvature of every scored
  layer (the fc's output side its softmax Gauss-Newton factor; curvature.KroneckerCurvature); influence_last: the last
  checkpoint only; trak: TRAK-style projected fc features;
- ekfac, ekfac_last (not run by default): the fc influence with the eigenvalue-corrected curvature (EK-FAC; George et
  al. 2018, Grosse et al. 2023), the reference K-FAC approximates (curvature.FcCurvature).
The damping lambda (relative to the mean curvature) is swept over orders of magnitude and chosen on the first
--select_subsets subsets, which are then left out of the reported LDS.

Why one module over 300 lines: the evaluator's whole protocol (subsets, records, retraining in processes or shards,
scoring every method) is read in one place; the score itself is lds_score.py, each method's matrix methods.py (the
same definition efficient_tracin streams).
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lib.cli import UserError, cli, fraction, nonneg_int, positive_int, skip
from lib.devices import resolve_device
from lib.files import save_json
from lib.ownership import Owner
from lib.prediction import logit_figures
from lib.processes import child_process, end_children
from TracIn.core.arguments import DAMPING
from TracIn.core.factors import choose_subset
from TracIn.core.methods import METHODS as REGISTRY, TRAK_DIM
from TracIn.core.results import run_id
from TracIn.core.run_folder import record_inputs, run_folder_path, tool_record
from TracIn.core.run import InfluenceRun
from TracIn.experiments.lds_score import (DAMPINGS, SubsetStore, check_subset_size, choose_damping, records_matrices,
                                          subset_indices)
from TracIn.experiments.retraining import Arm, Retrainer, original_exclusions, original_settings

log = logging.getLogger(__name__)
TOOL = "lds"
METHODS = tuple(REGISTRY)  # every method of the registry (TracIn/core/methods.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="TracIn/results", help="efficient_tracin.py output with its factor cache (default TracIn/results)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--checkpoint_dir", default=None, help="the original run (train_args.json; default: the checkpoints' folder)")
    p.add_argument("--out_dir", default=None, help="subset records and lds.json (default results_dir/lds)")
    p.add_argument("--retrain", choices=("head", "full"), default="head",
                   help="head: fc retrained on cached features; full: train.py with the original run's settings (default head)")
    p.add_argument("--arch", default=None, help="full retrains with this architecture (default: the original run's)")
    p.add_argument("--epochs", type=positive_int, default=None, help="full retrains for this many epochs (default: the original run's)")
    p.add_argument("--num_subsets", type=positive_int, default=None, help="random training subsets, each retrained (default 200 head, 50 full)")
    p.add_argument("--select_subsets", type=nonneg_int, default=None,
                   help="the first N subsets choose the damping and are left out of the reported LDS (default a quarter)")
    p.add_argument("--fraction", type=fraction(0.0, 1.0, lo_open=True), default=0.5, help="share of the training set per subset (default 0.5)")
    p.add_argument("--models_per_subset", type=positive_int, default=1, help="retrains per subset (seeds), margins averaged (default 1)")
    p.add_argument("--n_test", type=positive_int, default=200, help="seeded test images the LDS is measured on (default 200)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the subsets and the test images (default 0)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=[m for m in METHODS if REGISTRY[m].curvature != "ekfac"],
                   help="methods scored (default all but ekfac/ekfac_last, the EK-FAC reference that costs C times more)")
    p.add_argument("--trak_dim", type=positive_int, default=TRAK_DIM, help=f"TRAK-style features per checkpoint (default {TRAK_DIM})")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples of the test images (default 1000)")
    p.add_argument("--shard", type=shard_spec, default=None,
                   help="i/N: retrain only subsets j with j %% N == i, then stop (a Slurm array task; slurm_lds.sh); "
                        "a run without --shard, or with --merge, scores once every shard is done")
    p.add_argument("--merge", action="store_true", help="score the finished records only: refuse if any subset is missing")
    p.add_argument("--jobs", type=positive_int, default=1, help="retrain in N local processes, each a --shard i/N (default 1)")
    p.add_argument("--device", default="cpu", help="auto, cpu or cuda[:N] for the scores (default cpu)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="loader workers if the factor cache lacks rows (default 2)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if sum([args.shard is not None, args.merge, args.jobs > 1]) > 1:
        raise UserError("--shard, --merge and --jobs are one at a time: shards retrain, --merge scores, --jobs does both locally")
    if args.num_subsets is None:
        args.num_subsets = 200 if args.retrain == "head" else 50
    if args.select_subsets is None:
        args.select_subsets = args.num_subsets // 4
    if args.num_subsets - args.select_subsets < 3:
        raise UserError(f"--num_subsets {args.num_subsets} with --select_subsets {args.select_subsets} leaves "
                        f"{max(0, args.num_subsets - args.select_subsets)} subset(s) to report; the LDS (a Spearman "
                        "correlation over subsets) needs at least 3: pass a larger --num_subsets (12 or more by default)")
    if args.fraction >= 1.0:
        raise UserError("--fraction 1 retrains on the whole training set every time: nothing varies between subsets "
                        "and every LDS would be undefined; pass a share below 1, e.g. 0.5")
    if args.jobs > args.num_subsets:
        raise UserError(f"--jobs {args.jobs} is more processes than --num_subsets {args.num_subsets}; pass --jobs "
                        f"{min(args.num_subsets, os.cpu_count() or 1)} or fewer")
    if args.retrain == "head" and (args.arch or args.epochs):
        raise UserError("--arch and --epochs change a full retrain; --retrain head keeps the original run's fc and schedule")
    return args


def shard_spec(text: str) -> tuple[int, int]:
    """'i/N' with 0 <= i < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not i/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= i < N")
    return i, n


def fill_store(store: SubsetStore, run, settings: dict, candidates: np.ndarray, args) -> int:
    """Retrain every subset the store lacks; returns how many were retrained now."""
    y_train, y_test = run.train_list.labels, run.test_list.labels
    features = (run.features("train"), run.features("test")) if args.retrain == "head" else None
    retrainer = Retrainer(args.retrain, settings, args.data_dir, run.train_list, np.zeros(0, dtype=np.int64),
                          store.dir.parent / "work", store.dir.parent, TOOL, args.num_workers, args.device, features)
    done = 0
    for j in range(args.num_subsets):
        if store.has(j) or (args.shard is not None and j % args.shard[1] != args.shard[0]):
            continue
        idx = subset_indices(candidates, args.fraction, args.seed, j)
        keep = np.zeros(len(y_train), dtype=bool)
        keep[idx] = True
        logits = 0.0
        margins, losses = [], []
        for m in range(args.models_per_subset):
            # the original run's exclusions are outside every subset already (candidates), so in drop
            arm = Arm(f"subset_{j:05d}", np.flatnonzero(~keep), int(settings["seed"]) + 1000 * j + m)
            logits = retrainer.test_logits(arm, keep_folder=False)
            loss, margin, _ = logit_figures(logits[None], y_test)
            margins.append(margin[0])
            losses.append(loss[0])
        store.save(j, idx, np.mean(margins, 0), np.mean(losses, 0), float((logits.argmax(1) == y_test).mean()))
        done += 1
    return done


def retrain_in_processes(args, store: SubsetStore) -> int:
    """--jobs N: this command N times as --shard i/N in parallel processes (threads shared out; each one's output in
    out_dir/jobs/); returns how many records they added."""
    argv, skip = [], False
    for a in args.argv:  # the same arguments without --jobs
        if skip:
            skip = False
        elif a == "--jobs":
            skip = True
        elif not a.startswith("--jobs="):
            argv.append(a)
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    before = sum(store.has(j) for j in range(args.num_subsets))
    logs = store.dir.parent / "jobs"
    logs.mkdir(exist_ok=True)
    procs = []
    try:
        for i in range(args.jobs):
            with open(logs / f"shard_{i}.log", "w") as f:
                procs.append(child_process([sys.executable, "-m", "TracIn.lds", *argv, "--shard", f"{i}/{args.jobs}"], env=env,
                                           stdout=f, stderr=subprocess.STDOUT))
        failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    finally:  # interrupted: the shards (and their train.py children, by their own parent-death signal) end too
        end_children(procs)
    if failed:
        last = ((logs / f"shard_{failed[0]}.log").read_text().strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"LDS job(s) {', '.join(map(str, failed))} of {args.jobs} failed ({logs}): {last}")
    return sum(store.has(j) for j in range(args.num_subsets)) - before


def evaluate(args) -> dict:
    t0 = time.time()
    if args.select_subsets >= args.num_subsets:
        raise UserError(f"--select_subsets {args.select_subsets} leaves no subset to report of --num_subsets {args.num_subsets}")
    device = resolve_device(args.device)
    run = InfluenceRun.from_results(args.results_dir, args.data_dir, device, args.num_workers)
    run.require_full("the LDS")
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(run.paths[0]).parent
    settings = original_settings(ckpt_dir, args.arch, args.epochs)
    excluded = original_exclusions(ckpt_dir, run.train_list)
    candidates = np.setdiff1d(np.arange(run.n_train), excluded)
    check_subset_size(len(candidates), args.fraction, min_size=2 if args.retrain == "full" else 1)  # before any retrain
    out = Owner(TOOL).folder(Path(args.out_dir or Path(args.results_dir) / "lds"), "--out_dir").fill().path
    record_inputs(out, TOOL, {"tracin_run": run_id(run.record)})  # a derived folder: a new TracIn run clears it
    # The retrains depend on the data, the original run's settings and the subsets, not on how the run was scored: an
    # ensemble of the same original run (efficient_tracin --members) or another --score_fn reuses them (--out_dir).
    data = run.record["data"]
    identity = {"data": {k: data.get(k) for k in ("data_dir", "manifest_key", "train_key", "test_key")},
                "original_run": run.ckpts[run.members[0][-1]].get("train_run"),
                "original_checkpoint": run.shas[run.members[0][-1]], "retrain": args.retrain, "fraction": args.fraction, "seed": args.seed,
                "models_per_subset": args.models_per_subset, "settings": settings, "excluded": excluded.tolist()}
    store = SubsetStore(out, identity)
    t1 = time.time()
    if args.jobs > 1:
        retrained = retrain_in_processes(args, store)
    elif args.merge:
        missing = [j for j in range(args.num_subsets) if not store.has(j)]
        if missing:
            raise UserError(f"{len(missing)} of {args.num_subsets} subsets have no record in {store.dir} (first: "
                            f"{', '.join(map(str, missing[:5]))}); run their shards before --merge")
        retrained = 0
    else:
        retrained = fill_store(store, run, settings, candidates, args)
    seconds_retrain = time.time() - t1
    if args.shard is not None:
        log.info(f"LDS shard {args.shard[0]}/{args.shard[1]}: {retrained} subset(s) retrained in {seconds_retrain:.0f}s into {store.dir}; "
                 "score with --merge once every shard is done")
        return {"shard": list(args.shard), "retrained_now": retrained, "seconds_retrain": seconds_retrain}

    records = [store.load(j) for j in range(args.num_subsets)]
    group = choose_subset(run.n_test, min(args.n_test, run.n_test), args.seed)
    masks, margins = records_matrices(records, run.n_train, group)

    fs = run.group(group)
    t2 = time.time()
    candidates_scores: dict[str, dict] = {}
    for name in (m for m in METHODS if m in args.methods):  # every method of the registry, as efficient_tracin streams it
        method = REGISTRY[name]
        dampings = DAMPINGS if method.damped else (None,)
        candidates_scores[name] = {lam: fs.dense(method, lam, args.trak_dim) for lam in dampings}
    seconds_scores = time.time() - t2

    methods = {name: choose_damping(by_damping, masks, margins, args.select_subsets, args.bootstrap, args.seed, default=DAMPING)
               for name, by_damping in candidates_scores.items()}
    if args.select_subsets < 3 and any(len(v) > 1 for v in candidates_scores.values()):
        log.warning(f"warning: --select_subsets {args.select_subsets} is too few to choose a damping (3 or more); the damped "
                    f"methods are reported at the default damping {DAMPING}")
    for name in methods:  # a shipped K-FAC method as efficient_tracin ships it: its default damping, not the swept one
        if REGISTRY[name].shipped and REGISTRY[name].curvature == "kfac":
            reported = slice(args.select_subsets, None)  # the same reported subsets, no choice left to make
            at_default = choose_damping({DAMPING: candidates_scores[name][DAMPING]}, masks[reported], margins[reported], 0,
                                        args.bootstrap, args.seed)
            methods[name]["lds_at_default_damping"] = at_default["lds"]
            methods[name]["ci95_at_default_damping"] = at_default["ci95"]
    accuracy = np.asarray([float(r["accuracy"]) for r in records])
    result = {"retrain": args.retrain, "num_subsets": args.num_subsets, "select_subsets": args.select_subsets,
              "reported_subsets": args.num_subsets - args.select_subsets, "fraction": args.fraction, "n_test": len(group),
              "test_group": group.tolist(), "subset_model_accuracy": float(accuracy.mean()),
              "subset_model_accuracy_std": float(accuracy.std()), "methods": methods, "tracin_run": run_id(run.record),
              "retrained_now": retrained, "seconds_retrain": seconds_retrain, "seconds_scores": seconds_scores,
              "seconds": time.time() - t0}
    save_json(out / "lds.json", result)
    return result


def load(results, notes: list[str] | None = None, path=None) -> dict | None:
    """lds.json of a run (a TracInResults or its folder; `path`: another --out_dir's lds.json), checked: of this TracIn
    run, and a table (methods, each with a number lds and a two-number ci95). Otherwise one UserError line, or with
    `notes` a line there and None."""
    where = Path(path) if path is not None else run_folder_path(results) / "lds" / "lds.json"
    result = tool_record(results, "lds/lds.json", f"no {where}: run python -m TracIn.lds --results_dir {where.parent.parent} "
                                                  "first", notes, path, "rerun python -m TracIn.lds")

    if result is None:
        return None
    methods = result.get("methods")
    if not isinstance(methods, dict) or not all(isinstance(m, dict) and isinstance(m.get("ci95"), list)
                                                and len(m["ci95"]) == 2 and isinstance(m.get("lds"), (int, float))
                                                for m in methods.values()):  # a record of another version or hand-made
        return skip(f"{where} is not an LDS table of python -m TracIn.lds (methods with lds and ci95); rerun it", notes)
    return result


def table(result: dict) -> list[str]:
    lines = [f"LDS ({result['retrain']} retrain, {result['reported_subsets']} reported subsets of {result['fraction']:.0%}, "
             f"{result['n_test']} test images; subset models' accuracy {result['subset_model_accuracy']:.4f}):"]
    for name, m in result["methods"].items():
        lines.append(f"  {name:<18} {m['lds']:.3f}  [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
                     + (f"  damping {m['damping']:g} x mean curvature" + ("" if m.get("damping_chosen", True) or not m["sweep"]
                                                                              else " (default: too few subsets to choose)")
                        if m["damping"] is not None else "")
                     + (f" (at efficient_tracin's default {DAMPING:g}: {m['lds_at_default_damping']:.3f} "
                        f"[{m['ci95_at_default_damping'][0]:.3f}, {m['ci95_at_default_damping'][1]:.3f}])"
                        if "lds_at_default_damping" in m else ""))
        if m["sweep"]:
            lines.append("      damping sweep (select / report): " + ", ".join(
                f"{float(k):g}: {v['select']:.3f}/{v['report']:.3f}" for k, v in m["sweep"].items()))
    return lines


def main(argv=None):
    result = evaluate(parse_args(argv))
    if "methods" not in result:  # a shard: retrained, not scored
        return 0
    for line in table(result):
        log.info(line)
    return 0


if __name__ == "__main__":
    cli(main)
