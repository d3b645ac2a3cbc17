"""The scoring methods, each defined once: what efficient_tracin streams, the LDS and the counterfactual check measure.

    from TracIn.core.methods import FactorSet, METHODS
    fs = FactorSet(train_view, test_view, lrs, layers, train_labels, test_labels, device)
    views, layers, weights = fs.scoring_views(METHODS["influence_last"], damping=10.0)   # what score_topk streams
    matrix = fs.dense(METHODS["influence_last"], damping=10.0)                          # (n_test, n_train) float64

Every method is TracIn's ghost product sum_t w_t sum_l (a_te . a_tr)(d_te . d_tr) over a pair of factor views; a method
only says which views (a checkpoint subset, unit-norm training gradients, a curvature-whitened test side, TRAK's
features) and which weights w_t. `scoring_views` builds them; the streamed top-k (scores.score_topk) and the dense
matrix (`dense`, float64, for evaluation) both sum the same views, so what the LDS measures is what ships. EK-FAC
(`ekfac`, `ekfac_last`) is the one evaluation-only reference: its eigen-correction does not factor into views.

A FactorSet holds the training side once (its logits, squared gradient norms, K-FAC moments, TRAK kernel, built on
first use) so that scoring another test side (`with_test`: a test group, new images) costs no training-side pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib.cli import UserError
from TracIn.core.curvature import FcCurvature, KroneckerCurvature, TrakFeatures
from TracIn.core.ghost import self_influence


DEFAULT_SCORE_FN = "influence_last"  # the best LDS, head and full retraining, on both data sets (docs/lds.md)
SEED_SCORE_FN = "tracin"  # the seed's method: a run.json without a score_fn ran it, and its identity carries no score key
DAMPING = 10.0  # x the mean curvature: within 0.035 of each cell's best LDS on its held-apart subsets (docs/lds.md)
TRAK_DIM = 2048  # TRAK-style features per checkpoint


@dataclass(frozen=True)
class Method:
    """One scoring method. name: its name in lds.json, counterfactual.json and the docs; score_fn, normalize: the
    efficient_tracin flags that ship it (score_fn "" = evaluation only); last_only: the last checkpoint alone, weight 1;
    curvature: "none" (TracIn's gradients), "kfac", "trak" or "ekfac"; damped: takes --damping."""

    name: str
    score_fn: str
    normalize: str
    last_only: bool
    curvature: str
    summary: str

    @property
    def damped(self) -> bool:
        return self.curvature != "none"

    @property
    def shipped(self) -> bool:
        return bool(self.score_fn)

    @property
    def plain_gradients(self) -> bool:
        """Scores the gradients themselves (no curvature): --normalize applies, the default normalises the training
        side, and a shard scores alone (no statistic over the whole training set)."""
        return self.curvature == "none"

    @property
    def default_normalize(self) -> str:
        return "train" if self.plain_gradients else "none"

    def key(self, damping: float, trak_dim: int) -> dict:
        """What the method adds to a run's identity (nothing for the seed's method, so its runs keep their id)."""
        if self.score_fn == SEED_SCORE_FN:
            return {}
        trak = {"trak_dim": trak_dim} if self.curvature == "trak" else {}
        return {"score_fn": self.score_fn, **({"damping": damping} if self.damped else {}), **trak}


METHODS = {m.name: m for m in (
    Method("tracin", "tracin", "none", False, "none", "sum_t lr_t <g_t(x), g_t(z)> (Pruthi et al. 2020)"),
    Method("tracin_normalized", "tracin", "train", False, "none", "tracin with training gradients of unit norm per checkpoint"),
    Method("tracin_last", "tracin_last", "none", True, "none", "<g(x), g(z)> at the last checkpoint"),
    Method("influence", "influence", "none", False, "kfac", "sum_t lr_t g_t(x)^T (H_t + damping)^-1 g_t(z), H_t K-FAC"),
    Method("influence_last", "influence_last", "none", True, "kfac", "g(x)^T (H + damping)^-1 g(z) at the last checkpoint, H K-FAC"),
    Method("trak", "trak", "none", False, "trak", "TRAK-style projected fc features, the checkpoints as the ensemble"),
    Method("ekfac", "", "none", False, "ekfac", "fc influence with the EK-FAC curvature (evaluation reference)"),
    Method("ekfac_last", "", "none", True, "ekfac", "ekfac at the last checkpoint (evaluation reference)"),
)}
SCORE_FNS = tuple(dict.fromkeys(m.score_fn for m in METHODS.values() if m.shipped))  # efficient_tracin's --score_fn
NORMALIZABLE = tuple(dict.fromkeys(m.score_fn for m in METHODS.values() if m.shipped and m.plain_gradients))


def method_for(score_fn: str, normalize: str = "none") -> Method:
    """The method efficient_tracin runs for --score_fn/--normalize (normalize "both": tracin's cosine variant)."""
    for m in METHODS.values():
        if m.score_fn == score_fn and m.normalize == normalize:
            return m
    base = next((m for m in METHODS.values() if m.score_fn == score_fn), None)
    if base is None:
        raise UserError(f"--score_fn {score_fn!r}: choose one of {', '.join(SCORE_FNS)}")
    return Method(f"{base.name}_{normalize}", score_fn, normalize, base.last_only, base.curvature, base.summary)


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


class CheckpointsView:
    """A factor view restricted to some checkpoints: checkpoint t of this view is `steps[t]` of the underlying one."""

    def __init__(self, view, steps):
        self.view, self.steps = view, list(steps)

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view.load(self.steps[t], layer, rows, device)


def squared_norms(view, n: int, layers, n_ckpt: int, block: int, device) -> np.ndarray:
    """Per-checkpoint squared gradient norms |g_t|^2, (n_ckpt, n) float64: ghost.self_influence
    of each checkpoint alone over row blocks of a factor view. TracIn's self-influence is lrs @ this."""
    out = np.zeros((n_ckpt, n), dtype=np.float64)
    for c0 in range(0, n, block):
        rows = slice(c0, min(c0 + block, n))
        for t in range(n_ckpt):
            factors = {l: tuple(x.double() for x in view.load(t, l, rows, device)) for l in layers}
            out[t, rows] = self_influence([factors], [1.0]).cpu().numpy()
    return out


def ghost_matrix(test_view, train_view, n_test: int, n_train: int, layers, weights) -> np.ndarray:
    """(n_test, n_train) float64: sum_t w_t sum_l (A_te A_tr^T) * (D_te D_tr^T), every row of both views."""
    cpu = torch.device("cpu")
    out = torch.zeros(n_test, n_train, dtype=torch.float64)
    for t, w in enumerate(weights):
        for l in layers:
            a_te, d_te = (x.double() for x in test_view.load(t, l, slice(0, n_test), cpu))
            a_tr, d_tr = (x.double() for x in train_view.load(t, l, slice(0, n_train), cpu))
            out += w * (a_te @ a_tr.T) * (d_te @ d_tr.T)
    return out.numpy()


class FactorSet:
    """The factors every method scores from: a training view (held once, with what it costs a pass to compute) and a
    test view. Args: views with `load(t, layer, rows, device)`; lrs: lr_t per checkpoint; layers; labels per row
    (split labels, or the labels a query is explained under); logits (n_ckpt, n, C) of each side; members: the
    checkpoint indices of each training run of an ensemble (default: one run of every checkpoint). An ensemble's score
    is the mean of its members' scores: each member's checkpoint weights divided by the number of members, its last
    checkpoint for the *_last methods, its own curvature per checkpoint."""

    def __init__(self, train_view, test_view, lrs, layers, train_labels, test_labels, device, train_logits, test_logits,
                 block: int = 8192, curvature_store: Path | None = None, members: list[list[int]] | None = None):
        self.train_view, self.test_view = train_view, test_view
        self.lrs, self.layers, self.device, self.block = list(lrs), list(layers), device, block
        self.train_labels, self.test_labels = np.asarray(train_labels), np.asarray(test_labels)
        self.train_logits, self.test_logits = np.asarray(train_logits), np.asarray(test_logits)
        self.n_train, self.n_test = len(self.train_labels), len(self.test_labels)
        self._cache: dict = {}  # training-side quantities, shared with every with_test() copy
        self.curvature_store = curvature_store  # a file-name stem: K-FAC moments and inverses kept across runs
        self.members = [list(m) for m in members] if members else [list(range(len(self.lrs)))]
        if sorted(t for m in self.members for t in m) != list(range(len(self.lrs))):
            raise ValueError(f"members {self.members} do not partition the {len(self.lrs)} checkpoints")

    def checkpoint_weights(self, last_only: bool = False) -> tuple[list[int], list[float]]:
        """(checkpoint indices, weights) of the member mean: every checkpoint with lr_t / K, or each member's last
        with 1 / K. One member: every checkpoint with lr_t (or the last with 1.0), as a single run."""
        k = len(self.members)
        if last_only:
            return [m[-1] for m in self.members], [1.0 / k] * k
        return list(range(len(self.lrs))), [lr / k for lr in self.lrs]

    def with_test(self, test_view, test_labels, test_logits) -> "FactorSet":
        """The same training side (and its cached quantities) against another test side."""
        other = FactorSet(self.train_view, test_view, self.lrs, self.layers, self.train_labels, test_labels, self.device,
                          self.train_logits, test_logits, self.block, self.curvature_store, self.members)
        other._cache = self._cache
        return other

    def _cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def train_sq_norms(self) -> np.ndarray:
        """(n_ckpt, n_train) |g_t(z)|^2 float64, computed once."""
        return self._cached("sq_norms", lambda: squared_norms(self.train_view, self.n_train, self.layers, len(self.lrs),
                                                              self.block, self.device))

    def curvature(self, last_only: bool) -> KroneckerCurvature:
        """K-FAC moments of the training side (the fc's output side its Gauss-Newton factor), computed once."""
        def build():
            view, logits, n_ckpt = self.train_view, self.train_logits, len(self.lrs)
            if last_only:
                steps = self.checkpoint_weights(last_only=True)[0]
                view, logits, n_ckpt = CheckpointsView(view, steps), logits[steps], len(steps)
            gn = {"fc": logits} if "fc" in self.layers else None
            args = (view, self.n_train, self.layers, n_ckpt, self.block)
            if self.curvature_store is None:
                return KroneckerCurvature(*args, gauss_newton=gn)
            steps = "-last-" + "-".join(map(str, self.checkpoint_weights(True)[0])) if last_only else ""
            store = self.curvature_store.with_name(f"{self.curvature_store.name}-kfac{steps}.pt")
            return KroneckerCurvature.cached(store, *args, gauss_newton=gn)
        return self._cached(("kfac", last_only), build)

    def trak(self, dim: int) -> TrakFeatures:
        if "fc" not in self.layers:
            raise UserError(f"--score_fn trak scores the fc layer; --layers {' '.join(self.layers)} has none")
        return self._cached(("trak", dim), lambda: TrakFeatures(self.train_view, self.train_labels, self.train_logits, dim,
                                                               block=self.block))

    def scoring_views(self, method: Method, damping: float | None = None, trak_dim: int = TRAK_DIM) -> tuple[dict, list, list]:
        """({"test", "train"} views, layers, weights w_t) whose ghost product is `method`'s score."""
        if method.curvature == "ekfac":
            raise UserError(f"{method.name} is an evaluation reference with no streamed form; use dense()")
        layers = list(self.layers)
        steps, weights = self.checkpoint_weights(method.last_only)
        views = {"train": self.train_view, "test": self.test_view}
        test_logits = self.test_logits
        if method.last_only:
            views = {k: CheckpointsView(v, steps) for k, v in views.items()}
            test_logits = test_logits[steps]
        out = dict(views)
        if method.normalize != "none":
            sq = self.train_sq_norms()
            out["train"] = NormalizedView(views["train"], sq[steps], self.device)
        if method.normalize == "both":
            te_norms = squared_norms(views["test"], self.n_test, layers, len(weights), self.block, self.device)
            out["test"] = NormalizedView(views["test"], te_norms, self.device)
        if method.curvature == "kfac":
            out["test"] = self.curvature(method.last_only).whiten(views["test"], damping)
        elif method.curvature == "trak":
            trak = self.trak(trak_dim)
            out = {"train": trak.train_scoring_view(),
                   "test": trak.test_scoring_view(views["test"], self.test_labels, test_logits, damping)}
            layers, weights = ["fc"], [1.0 / len(self.members)] * len(weights)
        return out, layers, weights

    def dense(self, method: Method, damping: float | None = None, trak_dim: int = TRAK_DIM) -> np.ndarray:
        """(n_test, n_train) float64 scores of `method`: the sum scoring_views streams, or EK-FAC's reference."""
        if method.curvature == "ekfac":
            return self._ekfac(method.last_only, damping)
        views, layers, weights = self.scoring_views(method, damping, trak_dim)
        return ghost_matrix(views["test"], views["train"], self.n_test, self.n_train, layers, weights)

    def _ekfac(self, last_only: bool, damping: float) -> np.ndarray:
        if "fc" not in self.layers:
            raise UserError(f"ekfac needs the fc layer's factors; the TracIn run scored {', '.join(self.layers)}")
        cpu = torch.device("cpu")
        steps, weights = self.checkpoint_weights(last_only)
        out = 0.0
        for t, w in zip(steps, weights):
            a_tr, d_tr = self.train_view.load(t, "fc", slice(0, self.n_train), cpu)
            a_te, d_te = self.test_view.load(t, "fc", slice(0, self.n_test), cpu)
            curv = self._cached(("ekfac", t), lambda: FcCurvature(a_tr, torch.from_numpy(self.train_logits[t])))
            out = out + w * curv.scores(a_te, d_te, a_tr, d_tr, damping).numpy()
        return out
