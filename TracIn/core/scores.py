"""Stage 2 of TracIn: a method's scores streamed through a top-k, and self-influence, from cached factors.

    from TracIn.core.scores import score_topk
    tracker = score_topk(views["test"], views["train"], n_test, n_train, layers, lrs, top_k, test_block, train_block,
                         train_ids, device)     # blocks of (test x train) scores summed over checkpoints, then top-k

The full n_test x n_train matrix never exists. The views and weights come from the method registry
(methods.FactorSet.scoring_views); `score_factor_set` streams one method, `factors_and_scores` runs both stages for one
(shard of a) run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib.prediction import logit_figures
from TracIn.core.arguments import FactorArguments, ScoreArguments
from TracIn.core.factors import curvature_store, factor_views
from TracIn.core.methods import FactorSet, method_for
from TracIn.core.topk import TopKInfluenceTracker
from TracIn.core.ghost import ghost_influence_block


def score_topk(test_view, train_view, n_test: int, n_train: int, layers, lrs,
               top_k: int, test_block: int, train_block: int, train_ids: np.ndarray, device) -> TopKInfluenceTracker:
    """Blocked exact TracIn + streaming top-k; train_ids maps local train rows to split indices."""
    n_ckpt = len(lrs)
    tracker = TopKInfluenceTracker(n_test, top_k, device=device)
    ids = torch.from_numpy(np.asarray(train_ids)).to(device)
    for r0 in range(0, n_test, test_block):
        rows = slice(r0, min(r0 + test_block, n_test))
        te = [{l: test_view.load(t, l, rows, device) for l in layers} for t in range(n_ckpt)]
        for c0 in range(0, n_train, train_block):
            cols = slice(c0, min(c0 + train_block, n_train))
            tr = [{l: train_view.load(t, l, cols, device) for l in layers} for t in range(n_ckpt)]
            tracker.update(ghost_influence_block(te, tr, lrs), ids[cols], rows=rows)
    return tracker


@dataclass
class ScoredRun:
    """Stage 2's output for one run, shard or merge: the top-k tracker, per training image arrays (shards.TRAIN_ARRAYS
    names: self_influence, train_ids, loss_last, ...; None where not computed), the test predictions and the summary
    figures (seconds per stage, forward batches run, layer dims) and factors_sha256 ({"train", "test"}: the digest of the
    cached factors read, FactorView.sha256; None for a merge, whose factors stay in the shards)."""

    tracker: TopKInfluenceTracker
    train_arrays: dict
    test_pred: np.ndarray
    summary: dict
    factors_sha256: dict | None = None


def fits_on_device(views: dict, device) -> bool:
    """GPU fast path: hold every factor on the device when they take under half its free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(v.nbytes() for v in views.values()) < 0.5 * free



def factors_and_scores(factor_args: FactorArguments, score_args: ScoreArguments, device, ckpts, shas, lrs, train_list, test_list,
                       train_ids, test_ids, cache_root: Path, num_workers: int, members=None) -> ScoredRun:
    """Stages 1 and 2 for the given training ids; factors cached under cache_root. members: each ensemble member's
    checkpoint indices (None: one run); scores, self-influence and the last-checkpoint arrays are member means."""
    t0 = time.time()
    views, computed, dims = factor_views(factor_args, device, ckpts, shas, train_list, test_list, train_ids, test_ids, cache_root,
                                         num_workers)
    t_factors = time.time() - t0
    t0 = time.time()
    scoring = {k: v.resident(device) for k, v in views.items()} if fits_on_device(views, device) else views
    train_logits, test_logits = views["train"].logits(), views["test"].logits()  # (n_ckpt, n_rows, C)
    fs = FactorSet(scoring["train"], scoring["test"], lrs, factor_args.layers, train_list.labels[train_ids],
                   test_list.labels[test_ids], device, train_logits, test_logits, block=score_args.train_block,
                   curvature_store=curvature_store(views["train"]), members=members)
    tracker, sq_norms = score_factor_set(fs, score_args, train_ids)
    steps, weights = fs.checkpoint_weights()
    self_inf = None if sq_norms is None else (np.asarray(weights, dtype=np.float64) @ sq_norms).astype(np.float32)
    loss, margin, el2n = logit_figures(train_logits, train_list.labels[train_ids])
    last = fs.checkpoint_weights(last_only=True)[0]  # each member's last checkpoint (one run: the last)
    train_arrays = {"self_influence": self_inf, "train_ids": np.asarray(train_ids, dtype=np.int64),
             "loss_last": loss[last].mean(0) if len(last) > 1 else loss[last[0]],
             "pred_last": train_logits[last].mean(0).argmax(1).astype(np.int64),
             "loss_per_ckpt": loss, "margin_per_ckpt": margin, "el2n_per_ckpt": el2n,
             "grad_sq_norm_per_ckpt": None if sq_norms is None else sq_norms.astype(np.float32)}
    summary = {"seconds_factors": t_factors, "seconds_scores": time.time() - t0, "batches_computed": computed,
             "layer_dims": {l: list(d) for l, d in dims.items()}}
    test_pred = test_logits[last].mean(0).argmax(1).astype(np.int64)  # the members' mean logits
    return ScoredRun(tracker, train_arrays, test_pred, summary, {split: v.sha256() for split, v in views.items()})


def score_factor_set(fs: FactorSet, score_args: ScoreArguments, train_ids: np.ndarray):
    """Stage 2 on a FactorSet: the streamed top-k of score_args' method and, with score_args.self_influence, the training
    images' per-checkpoint squared gradient norms (TracIn's own self-influence, whatever the method); (tracker, sq | None)."""
    sq_norms = fs.train_sq_norms() if score_args.self_influence else None
    method = method_for(score_args.score_fn, score_args.normalize)
    views, layers, weights = fs.scoring_views(method, score_args.damping, score_args.trak_dim)
    tracker = score_topk(views["test"], views["train"], fs.n_test, fs.n_train, layers, weights, score_args.top_k,
                         score_args.test_block, score_args.train_block, train_ids, fs.device)
    return tracker, sq_norms
