"""Stage 2 of TracIn: exact scores from cached factors, a streamed top-k, self-influence and normalisation.

    from TracIn.scores import score_topk
    tracker = score_topk(views["test"], views["train"], n_test, n_train, layers, lrs, top_k, test_block, train_block,
                         train_ids, device)     # blocks of (test x train) scores summed over checkpoints, then top-k

The full n_test x n_train matrix never exists. `factors_and_scores` runs both stages for one (shard of a) run.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from model_architecture import logit_figures
from TracIn.factors import factor_views
from TracIn.influence_utils import TopKInfluenceTracker, compute_ghost_influence_batch, self_influence


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
            tracker.update(compute_ghost_influence_batch(te, tr, lrs), ids[cols], rows=rows)
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


def fits_on_device(views: dict, device) -> bool:
    """GPU fast path: hold every factor on the device when they take under half its free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(v.nbytes() for v in views.values()) < 0.5 * free



def factors_and_scores(cfg, device, ckpts, shas, lrs, train_list, test_list, train_ids, test_ids, cache_root: Path, stop_after=None):
    """Stages 1 and 2 for the given training ids; factors cached under cache_root."""
    t0 = time.time()
    views, computed, dims = factor_views(cfg, device, ckpts, shas, train_list, test_list, train_ids, test_ids, cache_root,
                                         stop_after)
    t_factors = time.time() - t0
    t0 = time.time()
    scoring = {k: v.resident(device) for k, v in views.items()} if fits_on_device(views, device) else views
    sq_norms, self_inf = None, None
    if cfg.self_influence or cfg.normalize != "none":
        sq_norms = self_influence_from_view(scoring["train"], len(train_ids), cfg.layers, len(lrs), cfg.train_block, device)
    if cfg.self_influence:  # always TracIn's own definition, whatever --normalize is
        self_inf = (np.asarray(lrs, dtype=np.float64) @ sq_norms).astype(np.float32)
    score_views = dict(scoring)
    if cfg.normalize != "none":
        score_views["train"] = NormalizedView(scoring["train"], sq_norms, device)
    if cfg.normalize == "both":
        te_norms = self_influence_from_view(scoring["test"], len(test_ids), cfg.layers, len(lrs), cfg.test_block, device)
        score_views["test"] = NormalizedView(scoring["test"], te_norms, device)
    tracker = score_topk(score_views["test"], score_views["train"], len(test_ids), len(train_ids), cfg.layers, lrs, cfg.top_k,
                         cfg.test_block, cfg.train_block, train_ids, device)
    if not cfg.self_influence:
        sq_norms = None
    train_logits = views["train"].logits()  # (n_ckpt, n_train, C)
    loss, margin, el2n = logit_figures(train_logits, train_list.labels[train_ids])
    parts = {"self_influence": self_inf, "train_ids": np.asarray(train_ids, dtype=np.int64),
             "loss_last": loss[-1], "pred_last": train_logits[-1].argmax(1).astype(np.int64),
             "loss_per_ckpt": loss, "margin_per_ckpt": margin, "el2n_per_ckpt": el2n,
             "grad_sq_norm_per_ckpt": None if sq_norms is None else sq_norms.astype(np.float32)}
    extra = {"seconds_factors": t_factors, "seconds_scores": time.time() - t0, "batches_computed": computed,
             "layer_dims": {l: list(d) for l, d in dims.items()}}
    test_pred = views["test"].logits()[-1].argmax(1).astype(np.int64)
    return tracker, parts, test_pred, extra


