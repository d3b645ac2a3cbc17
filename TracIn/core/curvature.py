"""Curvature-aware scores on the factor cache: influence functions (K-FAC, EK-FAC) and a TRAK-style score.

Each one is TracIn's ghost product with the *test* side transformed once per checkpoint, so stage 2 (score_topk, the
streamed top-k, sharding) is unchanged and no per-example gradient of a training image is built:

- K-FAC influence (`KroneckerCurvature`): per checkpoint t and layer l, the training gradients' curvature is taken as
  D_tl (x) A_tl with A = mean(a a^T) over the training images and D = mean(d d^T) (empirical Fisher), or, for the
  output layer, D = mean(diag(p) - p p^T) (the Gauss-Newton matrix of softmax cross-entropy, `gauss_newton=True`).
  With the damping split over the two factors, (D + dD I)^{-1} (x) (A + dA I)^{-1} applied to g_te = d_te a_te^T is
  the outer product ((D + dD)^{-1} d_te)((A + dA)^{-1} a_te)^T: whitening a_te and d_te keeps the ghost product
  (a_te' . a_tr)(d_te' . d_tr) and TracIn's cost. A layer projected by --layers/--proj_dim is cached as (P, 1), so
  its A is the full second moment of the projected gradient (exact curvature in the projected space) and D = 1.
  The damping is `damping` x the mean eigenvalue of D (x) A, split as dD = sqrt(damping) mean(D),
  dA = sqrt(damping) mean(A) (all of it on A when D is 1 x 1).
- EK-FAC influence for the fc layer (`FcCurvature`, used by lds.py): eigenbases of the two Gauss-Newton factors and
  the exact curvature along each pair of eigenvectors (George et al. 2018; Grosse et al. 2023, as kronfluence).
  The eigen-correction does not factor, so its scores cost C times TracIn's; it is the reference that K-FAC
  approximates.
- TRAK-style (`TrakFeatures`; Park et al., ICML 2023): the fc gradient of the margin log(p / (1 - p)) projected to
  `dim` features by a seeded Gaussian (I_C (x) R), the after-kernel inverse (Phi^T Phi + damping)^{-1} of the
  training features, TRAK's 1 - p weight on the training side, and the checkpoints as the ensemble (summed).
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

EXACT_MAX = 4096  # fc heads up to this many weights get the exact Gauss-Newton matrix in FcCurvature


def _damped_inverse(m: torch.Tensor, shift: float) -> torch.Tensor:
    """(m + shift I)^{-1} of a symmetric PSD matrix, float64. A matrix with no curvature to damp (every output error
    zero: a saturated or diverged model) is refused with one line instead of linalg's error."""
    from lib.cli import UserError

    try:
        inverse = torch.linalg.inv(m + shift * torch.eye(len(m), dtype=m.dtype, device=m.device))
    except torch.linalg.LinAlgError:
        inverse = None
    if inverse is None or not torch.isfinite(inverse).all():
        raise UserError("the curvature of a checkpoint cannot be inverted (its loss gradients vanish or are not finite: a "
                        "saturated or diverged model); nothing was written: check the checkpoints (evaluate.py), or use "
                        "--score_fn tracin, which needs no curvature")
    return inverse


def gauss_newton_d(logits: torch.Tensor) -> torch.Tensor:
    """mean_i (diag(p_i) - p_i p_i^T): the output side of the softmax cross-entropy Gauss-Newton matrix, (C, C)."""
    p = torch.softmax(logits.double(), 1)
    return torch.diag(p.mean(0)) - p.T @ p / len(p)


def _key(text: str) -> tuple[int, str]:
    t, layer = text.split("|", 1)
    return int(t), layer


class KroneckerCurvature:
    """The Kronecker factors (A, D) per (checkpoint, layer) from the training rows of a factor view, and the test views
    they whiten.

    Args: train_view (FactorView-like), n_train rows, layers, n_ckpt, block rows per read,
    gauss_newton: {layer: (n_ckpt, n_train, C) logits} for layers whose D side is the Gauss-Newton factor."""

    store = None  # a file the moments and inverses are kept in (KroneckerCurvature.cached)

    @classmethod
    def cached(cls, store: Path, *args, **kwargs) -> "KroneckerCurvature":
        """The curvature kept in `store` (a file beside the factor cache, named by what the moments depend on): loaded
        when it holds every (checkpoint, layer) of this setting, else computed and written. A re-score then neither
        re-reads the training factors nor re-inverts a damping it has seen."""
        n_ckpt, layers = args[3], list(args[2])
        want = {(t, layer) for t in range(n_ckpt) for layer in layers}
        try:
            saved = torch.load(store, map_location="cpu", weights_only=True)
            moments = {_key(k): tuple(v) for k, v in saved["moments"].items()}
            inverses = {float(lam): {_key(k): tuple(v) for k, v in inv.items()} for lam, inv in saved["inverses"].items()}
            if set(moments) != want or any(set(inv) != want for inv in inverses.values()):
                raise ValueError("another setting")
            self = cls.__new__(cls)
            self.moments, self._inverses = moments, inverses
        except Exception:  # absent, truncated or of another setting: computed again (it is a cache)
            self = cls(*args, **kwargs)
            self.save(store)
        self.store = store
        return self

    def save(self, store: Path) -> None:
        from lib.files import atomic_path

        with atomic_path(store) as tmp:
            torch.save({"moments": {f"{t}|{layer}": list(v) for (t, layer), v in self.moments.items()},
                        "inverses": {str(lam): {f"{t}|{layer}": list(v) for (t, layer), v in inv.items()}
                                     for lam, inv in self._inverses.items()}}, tmp)

    def __init__(self, train_view, n_train: int, layers, n_ckpt: int, block: int = 8192, gauss_newton: dict | None = None):
        cpu = torch.device("cpu")
        self.moments = {}
        for t in range(n_ckpt):
            for layer in layers:
                a_sum = d_sum = None
                for r0 in range(0, n_train, block):
                    a, d = (x.double() for x in train_view.load(t, layer, slice(r0, min(r0 + block, n_train)), cpu))
                    a_sum = a.T @ a if a_sum is None else a_sum + a.T @ a
                    d_sum = d.T @ d if d_sum is None else d_sum + d.T @ d
                d_mom = d_sum / n_train
                if gauss_newton and layer in gauss_newton:
                    d_mom = gauss_newton_d(torch.from_numpy(np.asarray(gauss_newton[layer][t])))
                self.moments[(t, layer)] = (a_sum / n_train, d_mom)
        self._inverses: dict = {}  # damping -> {(t, layer): damped inverses}, kept for the next test side

    @staticmethod
    def damped_inverses(a_mom: torch.Tensor, d_mom: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        """((A + dA I)^{-1}, (D + dD I)^{-1}) with dD * dA (cross terms aside) = damping x mean eigenvalue of D (x) A."""
        mean_a, mean_d = float(torch.diagonal(a_mom).mean()), float(torch.diagonal(d_mom).mean())
        if len(d_mom) == 1:  # a projected layer, cached as (P, 1): all of the damping on A
            return _damped_inverse(a_mom, damping * mean_a), _damped_inverse(d_mom, 0.0)
        root = math.sqrt(damping)
        return _damped_inverse(a_mom, root * mean_a), _damped_inverse(d_mom, root * mean_d)

    def inverses(self, damping: float) -> dict:
        """{(t, layer): damped inverses} for this damping, computed once (and kept in `store`, when given)."""
        if damping not in self._inverses:
            self._inverses[damping] = {key: self.damped_inverses(a, d, damping) for key, (a, d) in self.moments.items()}
            if self.store is not None:
                self.save(self.store)
        return self._inverses[damping]

    def whiten(self, test_view, damping: float) -> "TransformedView":
        """The test view with (a, d) -> (a (A + dA)^{-1}, d (D + dD)^{-1}) per checkpoint and layer."""
        inverse = self.inverses(damping)
        return TransformedView(test_view, lambda t, layer, a, d: (a @ inverse[(t, layer)][0].to(a), d @ inverse[(t, layer)][1].to(d)))


class TransformedView:
    """A factor view whose rows go through fn(t, layer, a, d) -> (a', d') on load (float64 inside, the view's dtype out)."""

    def __init__(self, view, fn):
        self.view, self.fn = view, fn

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        a, d = self.view.load(t, layer, rows, device)
        a2, d2 = self.fn(t, layer, a.double(), d.double())
        return a2.to(a.dtype), d2.to(d.dtype)


def _gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(hashlib.sha256(f"trak-{seed}".encode()).hexdigest()[:15], 16))
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)


class TrakFeatures:
    """TRAK-style features of the fc layer: phi = (I_C (x) R) g_margin, a (C * k) vector per image, with R (F, k)
    Gaussian (identity when k >= F) and g_margin = -d a^T / (1 - p_y), the gradient of log(p_y / (1 - p_y)).

    Scoring views hold the features as the layer "fc" in the (P, 1) form of a projected layer, so score_topk's
    ghost product is the plain feature dot-product: the training side is phi (1 - p_y) (TRAK's Q), the test side
    (Phi^T Phi + damping x mean eigenvalue)^{-1} phi, per checkpoint (the ensemble is their sum).

    Args: train_view, train labels (n_train,), train logits (n_ckpt, n_train, C), dim (features, ~C * k), seed of R."""

    def __init__(self, train_view, train_labels: np.ndarray, train_logits: np.ndarray, dim: int, seed: int = 0,
                 block: int = 8192):
        cpu = torch.device("cpu")
        n_ckpt, n_train, n_classes = np.asarray(train_logits).shape
        width = train_view.load(0, "fc", slice(0, 1), cpu)[0].shape[1]
        k = max(1, -(-dim // n_classes))
        self.r = None if k >= width else _gaussian(width, k, seed)
        self.train_view, self.train_labels, self.train_logits = train_view, np.asarray(train_labels), np.asarray(train_logits)
        self.kernels = []
        for t in range(n_ckpt):
            kernel = None
            for r0 in range(0, n_train, block):
                rows = slice(r0, min(r0 + block, n_train))
                phi = self.features(t, *train_view.load(t, "fc", rows, cpu), self.train_labels[rows], self.train_logits[t, rows])
                kernel = phi.T @ phi if kernel is None else kernel + phi.T @ phi
            self.kernels.append(kernel)

    def features(self, t, a, d, labels, logits) -> torch.Tensor:
        """phi of the margin gradient, (n, C * k) float64."""
        a, d = a.double().cpu(), d.double().cpu()
        if self.r is not None:
            a = a @ self.r
        p = torch.softmax(torch.as_tensor(np.asarray(logits)).double(), 1)
        one_minus = (1 - p[torch.arange(len(p)), torch.as_tensor(labels)]).clamp_min(1e-12)
        return -(d[:, :, None] * a[:, None, :]).flatten(1) / one_minus[:, None]

    def train_scoring_view(self) -> "FeatureView":
        """The training side: phi (1 - p_y) = the projected loss gradient (TRAK's Q weight)."""
        def fn(t, rows, a, d):
            p = torch.softmax(torch.as_tensor(self.train_logits[t, rows]).double(), 1)
            q = 1 - p[torch.arange(len(p)), torch.as_tensor(self.train_labels[rows])]
            return self.features(t, a, d, self.train_labels[rows], self.train_logits[t, rows]) * q[:, None]
        return FeatureView(self.train_view, fn, len(self.train_labels))

    def test_scoring_view(self, test_view, test_labels: np.ndarray, test_logits: np.ndarray, damping: float) -> "FeatureView":
        """The test side: (Phi^T Phi + damping x its mean eigenvalue)^{-1} phi."""
        labels, logits = np.asarray(test_labels), np.asarray(test_logits)
        inverse = [_damped_inverse(k, damping * float(torch.diagonal(k).mean())) for k in self.kernels]
        return FeatureView(test_view, lambda t, rows, a, d: self.features(t, a, d, labels[rows], logits[t, rows]) @ inverse[t],
                           len(labels))


class FeatureView:
    """A view that serves fn(t, rows, a, d) -> features (n, k) of the fc layer as the layer "fc" in (P, 1) form."""

    def __init__(self, view, fn, n_rows: int):
        self.view, self.fn, self.n_rows = view, fn, n_rows

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        a, d = self.view.load(t, "fc", rows, torch.device("cpu"))
        phi = self.fn(t, np.arange(self.n_rows)[rows], a, d)
        return phi.to(device=device, dtype=a.dtype), torch.ones(len(phi), 1, device=device, dtype=a.dtype)


# ---------------------------------------------------------------- EK-FAC for the fc layer (the reference of K-FAC)
def dense_gauss_newton(a: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(1/n) sum_i Lambda_i (x) a_i a_i^T as a dense (C F, C F) float64 matrix, in the row-major order of W (C, F):
    the exact Hessian of the mean softmax cross-entropy of logits = a W^T in W (the model is linear in W)."""
    a, p = a.double(), torch.softmax(logits.double(), 1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]       # (n, C, C)
    h = torch.einsum("ncd,nf,ng->cfdg", lam, a, a) / len(a)           # (C, F, C, F)
    c, f = p.shape[1], a.shape[1]
    return h.reshape(c * f, c * f)


class FcCurvature:
    """The fc layer's Gauss-Newton matrix of softmax cross-entropy at one checkpoint, H = (1/n) sum_i Lambda_i (x) a_i a_i^T
    with Lambda_i = diag(p_i) - p_i p_i^T, in eigenvalue-corrected Kronecker form: eigenbases Q_L of mean(Lambda_i) and
    Q_A of mean(a_i a_i^T), and the exact curvature s[k, l] = (1/n) sum_i (q_k^T Lambda_i q_k) (q_l^T a_i)^2 along
    each product of eigenvectors. (Q_L (x) Q_A) diag(s) (Q_L (x) Q_A)^T equals H when H is Kronecker-diagonalisable
    by those bases and is its closest such approximation otherwise (EK-FAC).

    Args: a (n, F) fc inputs with the bias column, logits (n, C) of the training images."""

    def __init__(self, a: torch.Tensor, logits: torch.Tensor, exact_max: int = EXACT_MAX):
        a, p = a.double(), torch.softmax(logits.double(), 1)
        n = len(a)
        self.q_l = torch.linalg.eigh(gauss_newton_d(logits)).eigenvectors   # (C, C)
        self.q_a = torch.linalg.eigh(a.T @ a / n).eigenvectors              # (F, F)
        pq = p @ self.q_l                                                     # (n, C): p_i . q_k
        u = p @ self.q_l ** 2 - pq ** 2                                       # (n, C): q_k^T Lambda_i q_k
        self.s = u.T @ (a @ self.q_a) ** 2 / n                                # (C, F)
        # A small head (C x F <= exact_max) gets the exact matrix instead: dense, solved directly.
        self.dense = dense_gauss_newton(a, logits) if self.s.numel() <= exact_max else None

    def scores(self, a_te, d_te, a_tr, d_tr, damping: float) -> torch.Tensor:
        """g_te^T (H + damping * mean(s) I)^{-1} g_tr for every pair, with g = d a^T, (n_te, n_tr). In the eigenbasis the
        gradient stays an outer product (Q_L^T d)(Q_A^T a)^T, so the sum over the C x F entries splits by k."""
        lam = damping * float(self.s.mean())
        if self.dense is not None:
            g_te = (d_te.double()[:, :, None] * a_te.double()[:, None, :]).flatten(1)  # (n, C * F), W's row-major order
            g_tr = (d_tr.double()[:, :, None] * a_tr.double()[:, None, :]).flatten(1)
            eye = torch.eye(len(self.dense), dtype=torch.float64)
            return g_te @ torch.linalg.solve(self.dense + lam * eye, g_tr.T)
        at, ar = a_te.double() @ self.q_a, a_tr.double() @ self.q_a    # (n, F)
        dt, dr = d_te.double() @ self.q_l, d_tr.double() @ self.q_l    # (n, C)
        out = torch.zeros(len(at), len(ar), dtype=torch.float64)
        for k in range(self.s.shape[0]):
            out += torch.outer(dt[:, k], dr[:, k]) * ((at / (self.s[k] + lam)) @ ar.T)
        return out
