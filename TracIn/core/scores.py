"""Stage 2 of TracIn: a method's scores streamed through a top-k, and self-influence, from cached factors.

    from TracIn.core.scores import score_topk
    tracker = score_topk(views["test"], views["train"], n_test, n_train, layers, lrs, top_k, test_block, train_block,
                         train_ids, device)     # blocks of (test x train) scores summed over checkpoints, then top-k

The full n_test x n_train matrix never exists. The views and weights come from the method registry
(methods.FactorSet.scoring_views); `score_factor_set` streams one method of a FactorSet, for every caller: the job
(run.InfluenceRun.score), a finished run's lists and new images (InfluenceRun.topk).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from TracIn.core.arguments import ScoreArguments
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


def score_factor_set(fs: FactorSet, score_args: ScoreArguments, train_ids: np.ndarray):
    """Stage 2 on a FactorSet: the streamed top-k of score_args' method and, with score_args.self_influence, the training
    images' per-checkpoint squared gradient norms (TracIn's own self-influence, whatever the method); (tracker, sq | None)."""
    sq_norms = fs.train_sq_norms() if score_args.self_influence else None
    method = method_for(score_args.score_fn, score_args.normalize)
    views, layers, weights = fs.scoring_views(method, score_args.damping, score_args.trak_dim)
    tracker = score_topk(views["test"], views["train"], fs.n_test, fs.n_train, layers, weights, score_args.top_k,
                         score_args.test_block, score_args.train_block, train_ids, fs.device)
    return tracker, sq_norms
