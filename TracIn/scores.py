"""Stage 2 of TracIn: exact scores from cached factors, a streamed top-k, self-influence and normalisation.

    from TracIn.scores import score_topk
    tracker = score_topk(views["test"], views["train"], n_test, n_train, layers, lrs, top_k, test_block, train_block,
                         train_ids, device)     # blocks of (test x train) scores summed over checkpoints, then top-k

The full n_test x n_train matrix never exists. `factors_and_scores` runs both stages for one (shard of a) run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import UserError
from model_architecture import logit_figures
from TracIn.arguments import FactorArguments, ScoreArguments
from TracIn.curvature import KroneckerCurvature, TrakFeatures
from TracIn.factors import factor_views
from TracIn.influence_utils import ghost_influence_block, self_influence
from TracIn.topk import TopKInfluenceTracker


class NormalizedView:
    """A factor view whose per-checkpoint gradients have unit norm: every layer's D rows of checkpoint t
    are divided by |g_t| = sqrt(sum_l |a_l|^2 |d_l|^2), which divides the whole per-example gradient
    (Hammoudeh & Lowd's renormalised influence; the TracIn authors' cosine variant when both sides are)."""

    def __init__(self, view, sq_norms: np.ndarray, device):
        norms = np.sqrt(np.asarray(sq_norms, dtype=np.float64))  # (n_ckpt, n_rows)
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)  # a zero gradient scores 0 anyway
        self.view, self.inv = view, torch.from_numpy(inv.astype(np.float32)).to(device)

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        a, d = self.view.load(t, layer, rows, device)
        return a, d * self.inv[t, rows].unsqueeze(1).to(d.dtype)



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


def self_influence_from_view(view, n: int, layers, n_ckpt: int, block: int, device) -> np.ndarray:
    """Per-checkpoint squared gradient norms |g_t|^2, (n_ckpt, n) float64: influence_utils.self_influence
    of each checkpoint alone over row blocks of a factor view. TracIn's self-influence is lrs @ this."""
    out = np.zeros((n_ckpt, n), dtype=np.float64)
    for c0 in range(0, n, block):
        rows = slice(c0, min(c0 + block, n))
        for t in range(n_ckpt):
            factors = {l: tuple(x.double() for x in view.load(t, l, rows, device)) for l in layers}
            out[t, rows] = self_influence([factors], [1.0]).cpu().numpy()
    return out


@dataclass
class ScoredRun:
    """Stage 2's output for one run, shard or merge: the top-k tracker, per training image arrays (shards.TRAIN_ARRAYS
    names: self_influence, train_ids, loss_last, ...; None where not computed), the test predictions and the summary
    figures (seconds per stage, forward batches run, layer dims)."""

    tracker: TopKInfluenceTracker
    train_arrays: dict
    test_pred: np.ndarray
    summary: dict


class CheckpointsView:
    """A factor view restricted to some checkpoints: checkpoint t of this view is `steps[t]` of the underlying one."""

    def __init__(self, view, steps):
        self.view, self.steps = view, list(steps)

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view.load(self.steps[t], layer, rows, device)


def scoring_views(score_args: ScoreArguments, views: dict, lrs, train_logits: np.ndarray, test_logits: np.ndarray, train_labels: np.ndarray,
                  test_labels: np.ndarray, sq_norms, n_train: int, n_test: int, layers, device) -> tuple[dict, list, list[float]]:
    """The (test, train) views, layers and checkpoint weights that score_topk sums for score_args.score_fn:
    TracIn's own (normalised per --normalize), the last checkpoint alone, or a curvature-aware transform of the test side."""
    layers, weights = list(layers), list(lrs)
    if score_args.last_only:
        last = len(lrs) - 1
        views = {k: CheckpointsView(v, [last]) for k, v in views.items()}
        train_logits, test_logits, weights = train_logits[last:], test_logits[last:], [1.0]
        sq_norms = None if sq_norms is None else sq_norms[last:]
    out = dict(views)
    if score_args.normalize != "none":
        out["train"] = NormalizedView(views["train"], sq_norms, device)
    if score_args.normalize == "both":
        te_norms = self_influence_from_view(views["test"], n_test, layers, len(weights), score_args.test_block, device)
        out["test"] = NormalizedView(views["test"], te_norms, device)
    if score_args.score_fn.startswith("influence"):  # K-FAC; the fc's output side is its Gauss-Newton factor
        gn = {"fc": train_logits} if "fc" in layers else None
        curvature = KroneckerCurvature(views["train"], n_train, layers, len(weights), score_args.train_block, gauss_newton=gn)
        out["test"] = curvature.whiten(views["test"], score_args.damping)
    elif score_args.score_fn == "trak":
        if "fc" not in layers:
            raise UserError(f"--score_fn trak scores the fc layer; --layers {' '.join(layers)} has none")
        trak = TrakFeatures(views["train"], train_labels, train_logits, score_args.trak_dim, block=score_args.train_block)
        out = {"train": trak.train_scoring_view(),
               "test": trak.test_scoring_view(views["test"], test_labels, test_logits, score_args.damping)}
        layers, weights = ["fc"], [1.0] * len(weights)
    return out, layers, weights


def fits_on_device(views: dict, device) -> bool:
    """GPU fast path: hold every factor on the device when they take under half its free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(v.nbytes() for v in views.values()) < 0.5 * free



def factors_and_scores(factor_args: FactorArguments, score_args: ScoreArguments, device, ckpts, shas, lrs, train_list, test_list,
                       train_ids, test_ids, cache_root: Path, num_workers: int, stop_after=None):
    """Stages 1 and 2 for the given training ids; factors cached under cache_root."""
    t0 = time.time()
    views, computed, dims = factor_views(factor_args, device, ckpts, shas, train_list, test_list, train_ids, test_ids, cache_root,
                                         num_workers, stop_after)
    layers = factor_args.layers
    t_factors = time.time() - t0
    t0 = time.time()
    scoring = {k: v.resident(device) for k, v in views.items()} if fits_on_device(views, device) else views
    sq_norms, self_inf = None, None
    if score_args.self_influence or score_args.normalize != "none":
        sq_norms = self_influence_from_view(scoring["train"], len(train_ids), layers, len(lrs), score_args.train_block, device)
    if score_args.self_influence:  # always TracIn's own definition, whatever --normalize and --score_fn are
        self_inf = (np.asarray(lrs, dtype=np.float64) @ sq_norms).astype(np.float32)
    train_logits, test_logits = views["train"].logits(), views["test"].logits()  # (n_ckpt, n_rows, C)
    score_views, score_layers, weights = scoring_views(score_args, scoring, lrs, train_logits, test_logits,
                                                       train_list.labels[train_ids], test_list.labels[test_ids], sq_norms,
                                                       len(train_ids), len(test_ids), layers, device)
    tracker = score_topk(score_views["test"], score_views["train"], len(test_ids), len(train_ids), score_layers, weights, score_args.top_k,
                         score_args.test_block, score_args.train_block, train_ids, device)
    if not score_args.self_influence:
        sq_norms = None
    loss, margin, el2n = logit_figures(train_logits, train_list.labels[train_ids])
    train_arrays = {"self_influence": self_inf, "train_ids": np.asarray(train_ids, dtype=np.int64),
             "loss_last": loss[-1], "pred_last": train_logits[-1].argmax(1).astype(np.int64),
             "loss_per_ckpt": loss, "margin_per_ckpt": margin, "el2n_per_ckpt": el2n,
             "grad_sq_norm_per_ckpt": None if sq_norms is None else sq_norms.astype(np.float32)}
    summary = {"seconds_factors": t_factors, "seconds_scores": time.time() - t0, "batches_computed": computed,
             "layer_dims": {l: list(d) for l, d in dims.items()}}
    test_pred = test_logits[-1].argmax(1).astype(np.int64)
    return ScoredRun(tracker, train_arrays, test_pred, summary)


