"""Every method's full (n_test, n_train) score matrix from a factor cache, for evaluating them (lds.py): a small
test group against the whole training set, float64, one matrix per damping. efficient_tracin never builds these; it
streams the same scores through a top-k (scores.py)."""
from __future__ import annotations

import numpy as np
import torch

from TracIn.curvature import FcCurvature, KroneckerCurvature, TrakFeatures


def tracin_scores(test_view, train_view, layers, lrs, normalize: bool, only: int | None = None) -> np.ndarray:
    """(n_test, n_train) TracIn scores, float64, from two factor views (every row of each); `only`: that checkpoint
    alone, weight 1."""
    cpu = torch.device("cpu")
    out = 0.0
    for t, lr in enumerate(lrs):
        if only is not None:
            if t != only:
                continue
            lr = 1.0
        te = {l: [x.double() for x in test_view.load(t, l, slice(None), cpu)] for l in layers}
        tr = {l: [x.double() for x in train_view.load(t, l, slice(None), cpu)] for l in layers}
        block = sum((te[l][0] @ tr[l][0].T) * (te[l][1] @ tr[l][1].T) for l in layers)
        if normalize:
            sq = sum((tr[l][0] ** 2).sum(1) * (tr[l][1] ** 2).sum(1) for l in layers)
            block = block / torch.where(sq > 0, sq.sqrt(), torch.ones_like(sq))
        out = out + lr * block
    return out.numpy()


def ekfac_scores(test_view, train_view, train_logits: np.ndarray, lrs, dampings, last_only: bool) -> dict[float, np.ndarray]:
    """{damping: (n_test, n_train)} fc influence (EK-FAC Gauss-Newton), summed over checkpoints with lr_t, or the last."""
    cpu = torch.device("cpu")
    steps = [len(lrs) - 1] if last_only else range(len(lrs))
    out = {lam: 0.0 for lam in dampings}
    for t in steps:
        a_tr, d_tr = train_view.load(t, "fc", slice(None), cpu)
        a_te, d_te = test_view.load(t, "fc", slice(None), cpu)
        curv = FcCurvature(a_tr, torch.from_numpy(np.asarray(train_logits[t])))
        weight = 1.0 if last_only else lrs[t]
        for lam in dampings:
            out[lam] = out[lam] + weight * curv.scores(a_te, d_te, a_tr, d_tr, lam).numpy()
    return out


def influence_scores(test_view, train_view, n_train: int, layers, train_logits: np.ndarray, lrs, dampings, last_only: bool
                ) -> dict[float, np.ndarray]:
    """{damping: (n_test, n_train)} K-FAC influence over every scored layer (curvature.KroneckerCurvature; the fc's D side
    is its Gauss-Newton factor), summed over checkpoints with lr_t, or the last checkpoint with weight 1."""
    only = len(lrs) - 1 if last_only else None
    gn = {"fc": train_logits} if "fc" in layers else None
    curvature = KroneckerCurvature(train_view, n_train, layers, len(lrs), gauss_newton=gn)
    return {lam: tracin_scores(curvature.whiten(test_view, lam), train_view, layers, lrs, normalize=False, only=only)
            for lam in dampings}


def trak_scores(test_view, train_view, train_labels, train_logits, test_labels, test_logits, n_ckpt: int, dampings, dim: int
                ) -> dict[float, np.ndarray]:
    """{damping: (n_test, n_train)} TRAK-style scores of the fc layer (curvature.TrakFeatures), the checkpoints summed."""
    trak = TrakFeatures(train_view, train_labels, train_logits, dim)
    return {lam: tracin_scores(trak.test_scoring_view(test_view, test_labels, test_logits, lam), trak.train_scoring_view(), ["fc"],
                               [1.0] * n_ckpt, normalize=False) for lam in dampings}
