"""A finished TracIn run reopened from its folder: its checkpoints (checked unchanged), lr_t and factor cache, ready
to rank proponents with any --score_fn or to hand fc features to a retrainer, without a forward pass when the cache
is complete.

    from TracIn.run_factors import RunFactors
    run_factors = RunFactors("TracIn/results", "data/processed", torch.device("cpu"), num_workers=2)
    lists = run_factors.proponents(np.array([4, 17]), k=10, score_fn="influence_last")   # (2, 10) split indices
    x_train = run_factors.features("train")                                              # (n_train, F + 1)

Used by counterfactual_check.py (lists, k-NN, the fc retrainer's features) and lds.py (features, factor views).
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from common import UserError
from data_utils import list_split
from TracIn.arguments import DAMPING, FactorArguments, ScoreArguments, pick
from TracIn.factors import FactorView, factor_views, load_checkpoints
from TracIn.results import load_results
from TracIn.scores import score_topk, scoring_views, self_influence_from_view

log = logging.getLogger(__name__)


class RunFactors:
    """The TracIn run in results_dir, reopened: its checkpoints (checked unchanged), lrs and factor cache."""

    def __init__(self, results_dir: str, data_dir: str, device, num_workers: int):
        r = load_results(results_dir, data_dir=data_dir)
        rec = self.record = r.record
        if rec["args"].get("train_subset", 0) or rec["args"].get("num_shards", 1) > 1:
            raise UserError(f"{results_dir} scored a --train_subset or ran in shards; the check needs one unsharded run "
                            "over every training image")
        # the run's own settings (run.json), with this check's data, device and the checkpoints it recorded
        self.cfg = SimpleNamespace(**{**rec["args"], "output_dir": str(results_dir), "data_dir": data_dir, "device": str(device),
                                      "num_workers": num_workers, "overwrite": False,
                                      "checkpoints": [c["path"] for c in rec["checkpoints"]],
                                      "lr_weights": [c["lr"] for c in rec["checkpoints"]]})
        self.train_list, self.test_list = list_split(data_dir, "train"), list_split(data_dir, "test")
        self.paths, self.ckpts, self.lrs, shas = load_checkpoints(self.cfg, self.train_list.class_names)
        changed = [str(p) for p, s, c in zip(self.paths, shas, rec["checkpoints"]) if s != c["sha256"]]
        if changed:
            raise UserError(f"checkpoint(s) {', '.join(changed)} changed since the TracIn run in {results_dir}; rerun efficient_tracin.py")
        self.device, self.layers = device, self.cfg.layers
        self.n_train, self.n_test = len(self.train_list.paths), len(self.test_list.paths)
        views, computed, _ = factor_views(pick(FactorArguments, rec["args"]), device, self.ckpts, shas, self.train_list,
                                          self.test_list, np.arange(self.n_train), np.arange(self.n_test),
                                          Path(self.cfg.cache_dir or Path(results_dir) / "factors"), num_workers)
        if any(computed.values()):
            log.info(f"factor cache completed: {computed} forward batches")
        self.train_view, self.test_caches = views["train"], views["test"].caches

    def proponents(self, group: np.ndarray, k: int, score_fn: str = "tracin", normalize: str = "none") -> np.ndarray:
        """(len(group), k) split indices of the top-k proponents, exactly as efficient_tracin ranks them with that
        --score_fn and --normalize."""
        recorded = self.record["args"]  # blocks and damping as the run had them (a record of an older version lacks some)
        cfg = ScoreArguments(score_fn=score_fn, normalize=normalize, top_k=k, damping=recorded.get("damping", DAMPING),
                             trak_dim=recorded.get("trak_dim", 2048), test_block=recorded.get("test_block", 1024),
                             train_block=recorded.get("train_block", 8192))
        views = {"train": self.train_view, "test": FactorView(self.test_caches, group)}
        sq = None
        if normalize != "none":
            sq = self_influence_from_view(self.train_view, self.n_train, self.layers, len(self.lrs), cfg.train_block, self.device)
        score_views, layers, weights = scoring_views(cfg, views, self.lrs, self.train_view.logits(), views["test"].logits(),
                                                     self.train_list.labels, self.test_list.labels[group], sq, self.n_train,
                                                     len(group), self.layers, self.device)
        tracker = score_topk(score_views["test"], score_views["train"], len(group), self.n_train, layers, weights,
                             k, cfg.test_block, cfg.train_block, np.arange(self.n_train), self.device)
        return tracker.proponents()[1].cpu().numpy()

    def features(self, split: str) -> torch.Tensor:
        """The last checkpoint's fc input per image of a split, with the bias column of ones: (n, F + 1)."""
        if "fc" not in self.layers:
            raise UserError(f"knn and --retrain head need the fc layer's factors; the TracIn run scored {', '.join(self.layers)}")
        view = self.train_view if split == "train" else FactorView(self.test_caches, np.arange(self.n_test))
        return view.load(len(self.lrs) - 1, "fc", slice(None), torch.device("cpu"))[0].double()
