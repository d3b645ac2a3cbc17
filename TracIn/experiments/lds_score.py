"""The linear datamodeling score itself (Park et al., TRAK, ICML 2023, eq. 4): per test image, the Spearman correlation
over subsets between a method's summed scores and the retrained margins; its bootstrap interval; the damping choice on
held-apart subsets. Pure numpy on arrays, and the store of the subsets' records (SubsetStore); lds.py makes the subsets.

    masks, margins = records_matrices(records, n_train, group)          # (n_subsets, n_train), (n_subsets, n_group)
    per_test = lds(scores, masks, margins)                              # scores: (n_group, n_train)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.cli import UserError
from lib.files import atomic_path, identity_mismatch, load_npz, read_json, save_json

DAMPINGS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0, 1e4)  # times the mean curvature (holds methods.DAMPING)


def subset_size(n: int, fraction: float) -> int:
    """Training images per subset: round(fraction * n) of the n candidates."""
    return int(round(fraction * n))


def check_subset_size(n: int, fraction: float, min_size: int = 1) -> int:
    """The subset size, refused before any retrain when the subsets cannot give a finite LDS: with no image (every
    prediction sum_{z in S_j} tau is 0) or every candidate (every subset the same) nothing varies over the subsets, and
    every Spearman correlation is undefined. min_size: the fewest images a retrain takes (train.py: 2, for batch norm)."""
    m = subset_size(n, fraction)
    if not min_size <= m <= n - 1:
        lo, hi = min_size / n, (n - 1) / n  # fractions of min_size .. n - 1 images
        fix = (f"pass a --fraction from {lo:.3g} to {hi:.3g}" if lo <= hi else
               f"{n} training images are too few for subsets of {min_size} or more that differ")
        raise UserError(f"--fraction {fraction:g} of {n} training images is {m} per subset: nothing would vary over the "
                        f"subsets and every LDS would be undefined (NaN); nothing was retrained: {fix}")
    return m


def spearman_rows(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman correlation per column between pred and actual, both (n_subsets, n_test); NaN where constant."""
    def ranks(x):
        order = np.argsort(x, axis=0, kind="stable")
        r = np.empty_like(order, dtype=np.float64)
        np.put_along_axis(r, order, np.arange(len(x), dtype=np.float64)[:, None].repeat(x.shape[1], 1), axis=0)
        # ties share their mean rank
        for j in range(x.shape[1]):
            col = x[:, j]
            if len(np.unique(col)) < len(col):
                _, inv, counts = np.unique(col, return_inverse=True, return_counts=True)
                sums = np.bincount(inv, weights=r[:, j])
                r[:, j] = (sums / counts)[inv]
        return r

    rp, ra = ranks(pred), ranks(actual)
    rp -= rp.mean(0)
    ra -= ra.mean(0)
    denom = np.sqrt((rp ** 2).sum(0) * (ra ** 2).sum(0))
    return np.where(denom > 0, (rp * ra).sum(0) / np.where(denom > 0, denom, 1), np.nan)


def lds(scores: np.ndarray, masks: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """Per test image: Spearman over subsets of sum_{z in S_j} scores[x, z] against margins[j, x].

    Args: scores (n_test, n_train), masks (n_subsets, n_train) bool, margins (n_subsets, n_test)."""
    pred = masks.astype(np.float64) @ np.asarray(scores, dtype=np.float64).T  # (n_subsets, n_test)
    return spearman_rows(pred, margins)


def nan_mean(values: np.ndarray) -> float:
    """Mean over the test images whose correlation is defined; NaN when none is."""
    v = values[np.isfinite(values)]
    return float(v.mean()) if len(v) else float("nan")


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over resampled test images."""
    v = values[np.isfinite(values)]
    if len(v) == 0:  # every test image's correlation undefined (e.g. constant predictions over the subsets)
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def records_matrices(records: list[dict], n_train: int, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(masks (n_subsets, n_train) bool, margins (n_subsets, len(group))) of a store's records."""
    masks = np.zeros((len(records), n_train), dtype=bool)
    for j, r in enumerate(records):
        masks[j, r["train_idx"]] = True
    return masks, np.stack([r["margin"][group] for r in records])


def choose_damping(by_damping: dict, masks: np.ndarray, margins: np.ndarray, select_subsets: int, bootstrap: int, seed: int,
                   default=None) -> dict:
    """One method's result from {damping (None: no damping): (n_test, n_train) scores}: the damping with the best LDS on
    the first select_subsets subsets, its LDS on the others (the reported ones) with a bootstrap interval, the sweep.
    With fewer than 3 selection subsets (or no finite selection LDS) nothing is chosen: `default` is reported, and
    "damping_chosen" says so."""
    select, report = slice(0, select_subsets), slice(select_subsets, len(masks))
    sweep = {}
    for lam, s in by_damping.items():
        sel = lds(s, masks[select], margins[select]) if select_subsets >= 3 else np.full(margins.shape[1], np.nan)
        rep = lds(s, masks[report], margins[report])
        sweep[lam] = {"select": nan_mean(sel), "report": nan_mean(rep), "per_test": rep}
    # the damping is chosen on the held-apart subsets only
    finite = {lam: v["select"] for lam, v in sweep.items() if np.isfinite(v["select"])}
    was_chosen = len(sweep) > 1 and bool(finite)
    if was_chosen:
        chosen = max(finite, key=finite.get)
    else:
        chosen = default if default in sweep else next(iter(sweep))
    per_test = sweep[chosen]["per_test"]
    lo, hi = bootstrap_interval(per_test, bootstrap, seed)
    return {"lds": nan_mean(per_test), "ci95": [lo, hi], "damping": chosen, "damping_chosen": was_chosen,
            "sweep": {str(lam): {"select": v["select"], "report": v["report"]} for lam, v in sweep.items()} if len(sweep) > 1 else None,
            "per_test": per_test.tolist()}


# ---------------------------------------------------------------- the subset records (one .npz per retrained subset)
def subset_indices(candidates: np.ndarray, fraction: float, seed: int, j: int) -> np.ndarray:
    """Subset j: a seeded draw of round(fraction * len(candidates)) training images, sorted."""
    m = subset_size(len(candidates), fraction)
    return np.sort(np.random.default_rng([seed, j]).choice(candidates, size=m, replace=False))


class SubsetStore:
    """One .npz per subset in out/subsets/ (train indices, test margins and losses), under an identity saved in
    out/store.json: records of another TracIn run, data or subset setting are never mixed in."""

    def __init__(self, out: Path, identity: dict):
        self.dir = out / "subsets"
        saved = out / "store.json"
        records = list(self.dir.glob("subset_*.npz")) if self.dir.is_dir() else []
        if saved.exists() and records:
            differs = identity_mismatch(read_json(saved, "pass another --out_dir"), identity)
            if differs:
                raise UserError(f"{out} holds LDS records of another setting ({differs}); pass another --out_dir")
        else:  # no record yet (a first run, or one that failed before its first subset): nothing to keep apart
            save_json(saved, identity)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, j: int) -> Path:
        return self.dir / f"subset_{j:05d}.npz"

    def has(self, j: int) -> bool:
        return self.path(j).exists()

    def save(self, j: int, train_idx: np.ndarray, margin: np.ndarray, loss: np.ndarray, accuracy: float) -> None:
        with atomic_path(self.path(j)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, train_idx=train_idx.astype(np.int32), margin=margin.astype(np.float32), loss=loss.astype(np.float32),
                         accuracy=np.float64(accuracy))

    def load(self, j: int) -> dict:
        return load_npz(self.path(j), ("train_idx", "margin", "loss", "accuracy"),
                        "delete it and rerun to retrain that subset")
