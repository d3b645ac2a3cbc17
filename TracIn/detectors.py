"""The mislabel detectors, each defined once, and the figures that score a ranking against known label errors.

    from TracIn.detectors import detector_scores, roc_auc
    scores = detector_scores(results, dynamics, train_ids)    # {detector: (n_train,) score, higher = more suspicious}
    auc = roc_auc(scores["ensemble"], is_bad)

Detectors (higher = more suspicious), all from data the pipeline already computed:
- self_influence: TracIn's sum_t lr_t |g_t|^2 (Pruthi et al. 2020, section 5), as in the paper;
- self_influence_rank: scale-free TracIn: each checkpoint's |g_t|^2 turned into a rank quantile,
  averaged over checkpoints (no checkpoint's learning rate or heavy-tailed |a|^2 dominates);
- el2n: |softmax - onehot| averaged over the TracIn checkpoints (Paul et al. 2021);
- loss_mean: cross-entropy averaged over the TracIn checkpoints; loss_last: at the last one;
- aum: minus the area under the margin over training epochs (Pleiss et al. 2020), from
  train.py's training_dynamics.npz;
- forgetting: forgetting events over training epochs (Toneva et al. 2019; never learned counts
  as epochs + 1), from training_dynamics.npz;
- opponent_count: appearances in the top-k opponent lists of the test images;
- ensemble (the default): the mean rank quantile of loss_last and aum (loss_last alone without
  training dynamics); chosen by the table in docs/mislabel.md over 8 data set x noise cells.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from TracIn.core.results import appearances

FRACTIONS = (0.05, 0.10, 0.20)
DETECTORS = ("ensemble", "aum", "loss_mean", "el2n", "self_influence_rank", "self_influence", "loss_last", "forgetting",
             "opponent_count")
# Chosen by the table in docs/mislabel.md (8 cells: 2 data sets x 2 noise kinds x 2 rates): the rank mean of
# the final model's loss and the training run's AUM beats every single detector in every cell.
ENSEMBLE_MEMBERS = ("loss_last", "aum")
DEFAULT_SCORE = "ensemble"


def recall_at(scores: np.ndarray, is_bad: np.ndarray, fraction: float) -> float:
    """Share of the bad examples among the top `fraction` of examples by score."""
    k = int(round(fraction * len(scores)))
    top = np.argsort(-scores, kind="stable")[:k]
    return float(is_bad[top].sum() / max(is_bad.sum(), 1))


def roc_auc(scores: np.ndarray, is_bad: np.ndarray) -> float:
    """Probability that a random bad example outscores a random good one (ties count half)."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    n_pos, n_neg = int(is_bad.sum()), int((~is_bad).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[is_bad].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: np.ndarray, is_bad: np.ndarray) -> float:
    """Mean over the bad examples of the precision at their rank (ties broken by order)."""
    hits = is_bad[np.argsort(-scores, kind="stable")]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def rank_quantile(x: np.ndarray) -> np.ndarray:
    """Average-rank quantile in (0, 1]; NaN (not measured) ranks lowest."""
    x = np.where(np.isnan(x), -np.inf, x)
    return pd.Series(x).rank(method="average", pct=True).to_numpy()


def forgetting_events(correct: np.ndarray) -> np.ndarray:
    """Per image: transitions learned -> forgotten over epochs (correct -1 = not seen, skipped);
    never learned: epochs + 1. correct is int8 (epochs, n)."""
    n_epochs, n = correct.shape
    events = np.zeros(n, dtype=np.float64)
    ever = np.zeros(n, dtype=bool)
    prev = np.full(n, -1, dtype=np.int8)
    for e in range(n_epochs):
        c = correct[e]
        seen = c >= 0
        events += seen & (prev == 1) & (c == 0)
        ever |= c == 1
        prev = np.where(seen, c, prev)
    return np.where(ever, events, n_epochs + 1)


def aum(margin: np.ndarray) -> np.ndarray:
    """Minus the mean margin over the epochs an image was seen (NaN: never seen)."""
    margin = margin.astype(np.float64)
    seen = ~np.isnan(margin)
    return np.where(seen.any(0), -np.nansum(margin, 0) / np.maximum(seen.sum(0), 1), np.nan)


def detector_scores(r, dynamics: list[dict], train_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Every detector's score per scored training image (higher = more suspicious); `dynamics`: the training
    dynamics of each training run behind r (one, or an ensemble's members: AUM and forgetting are their means)."""
    s = {"loss_last": np.asarray(r["train_loss_last"], dtype=np.float64)}
    if "train_loss_per_ckpt" in r:
        s["loss_mean"] = np.asarray(r["train_loss_per_ckpt"], dtype=np.float64).mean(0)
    if "train_el2n_per_ckpt" in r:
        s["el2n"] = np.asarray(r["train_el2n_per_ckpt"], dtype=np.float64).mean(0)
    if "self_influence" in r:
        s["self_influence"] = np.asarray(r["self_influence"], dtype=np.float64)
    if "train_grad_sq_norm_per_ckpt" in r:
        norms = np.asarray(r["train_grad_sq_norm_per_ckpt"], dtype=np.float64)
        s["self_influence_rank"] = np.mean([rank_quantile(row) for row in norms], axis=0)
    if dynamics and all(len(d["margin"]) for d in dynamics):
        s["aum"] = np.mean([aum(d["margin"][:, train_ids]) for d in dynamics], axis=0)
        s["forgetting"] = np.mean([forgetting_events(d["correct"][:, train_ids]) for d in dynamics], axis=0).astype(np.float64)
    s["opponent_count"] = appearances(r, "opponents", int(train_ids.max(initial=0)) + 1)[train_ids].astype(np.float64)
    members = [m for m in ENSEMBLE_MEMBERS if m in s]
    s["ensemble"] = np.mean([rank_quantile(s[m]) for m in members], axis=0)
    return {name: s[name] for name in DETECTORS if name in s}
