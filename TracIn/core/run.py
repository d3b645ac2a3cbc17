"""The run object: one TracIn run's inputs resolved once, and the factors and scores every tool takes from it.

    from TracIn.core.run import InfluenceRun
    run = InfluenceRun(TracInConfig(top_k=20))                        # a new run: efficient_tracin's job
    run = InfluenceRun.from_results("TracIn/results", device="cpu")   # a finished run: lds, counterfactual, notebooks
    fs = run.factors()                                                 # methods.FactorSet over every scored row
    lists = run.proponents(np.array([4, 17]), k=10, score_fn="influence_last")   # (2, 10) split indices
    hits = run.explain_factors(images, labels)                         # a FactorSet of new images vs the cached training side

It reads the two splits and checks their classes, picks the scored rows (--train_subset/--test_subset), loads the
checkpoints (one model family, lr_t, sha256 of each file), expands --layers to modules and checks each projection: once,
for the CLI (job.py), the shards and merge, the LDS, the counterfactual check, clean-and-retrain and the notebook API
(api.py). A finished run is reopened with the settings its run.json recorded, its checkpoints checked unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from lib.checkpoints import model_from_checkpoint, model_record
from lib.cli import UserError
from lib.data_utils import check_manifest, data_identity, list_split
from lib.devices import model_to_device, resolve_device
from TracIn.core.arguments import FactorArguments, ScoreArguments, TracInConfig, pick
from TracIn.core.factors import FactorView, choose_subset, curvature_store, factor_views, load_checkpoints, make_hook
from TracIn.core.methods import FactorSet, method_for
from TracIn.core.results import load_results, recorded_data_dir
from TracIn.core.scores import score_topk
from TracIn.core.ghost import target_layers

log = logging.getLogger(__name__)


def check_curvature_size(method, dims: dict) -> None:
    """A K-FAC curvature holds an (A x A) and a (D x D) float64 matrix per layer; an unprojected conv layer's A is its
    whole gradient (--proj_dim 0), whose square would exhaust any memory. Refused with the flags that fit."""
    import os

    if method.curvature not in ("kfac", "ekfac"):
        return
    need = sum(8 * (a * a + d * d) for a, d in dims.values())
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 64 * 2**30
    if need > memory // 2:
        widest = max(dims, key=lambda l: dims[l][0])
        raise UserError(f"--score_fn {method.score_fn}: the curvature of layer {widest} ({dims[widest][0]:,} inputs per "
                        f"gradient) needs {need / 2**30:,.0f} GiB, more than half of this machine's "
                        f"{memory / 2**30:.0f} GiB; project conv layers (--proj_dim 16) or use --score_fn tracin")


class InfluenceRun:
    """One run's inputs. cfg: a TracInConfig (or a namespace with its fields). Attributes: train_list, test_list
    (SplitListing), train_ids, test_ids (the scored split indices), paths, ckpts, lrs, shas (per checkpoint), layers
    (expanded), factor_args (FactorArguments), factor_key (what the cached factors depend on)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = resolve_device(getattr(cfg, "device", "cpu"))  # a bad --device is the first thing said
        self.train_list, self.test_list = list_split(cfg.data_dir, "train"), list_split(cfg.data_dir, "test")
        if self.train_list.class_names != self.test_list.class_names:
            raise UserError(f"train and test class folders differ in {cfg.data_dir}")
        check_manifest(cfg.data_dir, {"train": self.train_list, "test": self.test_list})
        self.paths, self.ckpts, self.lrs, self.shas, self.members, self.chosen = load_checkpoints(cfg, self.train_list.class_names)
        self.n_train, self.n_test = len(self.train_list.paths), len(self.test_list.paths)
        self.train_ids = choose_subset(self.n_train, cfg.train_subset, cfg.seed)
        self.test_ids = choose_subset(self.n_test, cfg.test_subset, cfg.seed + 1)
        model0 = model_from_checkpoint(self.ckpts[0])
        try:  # blocks expand to their layers
            self.layers = target_layers(model0, cfg.layers)
        except ValueError as e:
            raise UserError(f"--layers: {e}") from None
        self.factor_args = replace(pick(FactorArguments, cfg), layers=tuple(self.layers))
        try:  # each layer's projection checked against its width
            hook = make_hook(model0, self.factor_args)
        except ValueError as e:
            raise UserError(str(e)) from None
        self.factor_key = self.factor_args.key(projected=any(hook.projected.values()))
        check_curvature_size(method_for(getattr(cfg, "score_fn", "tracin"), getattr(cfg, "normalize", "none")), hook.dims)
        self.record, self.results_dir, self.sharded = None, None, False
        self._factor_set, self._models = None, None

    @classmethod
    def from_results(cls, results_dir, data_dir=None, device="cpu", num_workers: int = 0) -> "InfluenceRun":
        """The run in results_dir (efficient_tracin's --output_dir) with the settings its run.json recorded, on
        data_dir (default: the data it recorded, checked unchanged), its checkpoints checked unchanged."""
        r = load_results(results_dir)
        rec = r.record
        data_dir = str(data_dir or recorded_data_dir(rec))
        load_results(results_dir, data_dir=data_dir)  # the data checked against the record
        defaults = {k: v for k, v in asdict(TracInConfig()).items() if k not in ("score_fn", "normalize")}
        args = {**defaults, **rec["args"], "output_dir": str(results_dir), "data_dir": data_dir, "device": str(device),
                "num_workers": num_workers, "overwrite": False, "checkpoints": [c["path"] for c in rec["checkpoints"]],
                "lr_weights": [c["lr"] for c in rec["checkpoints"]], "num_shards": 1, "shard_index": 0, "merge": False,
                "members": [], "member_sizes": rec["args"].get("member_sizes") or [len(rec["checkpoints"])]}
        run = cls(SimpleNamespace(**args))
        changed = [str(p) for p, s, c in zip(run.paths, run.shas, rec["checkpoints"]) if s != c["sha256"]]
        if changed:
            raise UserError(f"checkpoint(s) {', '.join(changed)} changed since the TracIn run in {results_dir}; rerun "
                            "efficient_tracin.py")
        if not np.array_equal(run.train_ids, np.asarray(r["train_indices"])) or \
                not np.array_equal(run.test_ids, np.asarray(r["test_indices"])):
            raise UserError(f"{results_dir}'s train/test indices do not match its recorded subset settings; rerun efficient_tracin.py")
        run.record, run.results_dir, run.results = rec, Path(results_dir), r
        run.sharded = rec["args"].get("num_shards", 1) > 1
        return run

    # ------------------------------------------------------------------ identity
    def identity(self, data_id: dict | None = None) -> dict:
        """What a run's scores depend on, before stage 1 (its factors' cache key; results.tracin_outputs adds the
        digest of the factors read, ScoredRun.factors_sha256); results.run_id hashes it."""
        c = self.cfg
        data_id = data_id if data_id is not None else data_identity(c.data_dir)
        score_key = pick(ScoreArguments, c).key()
        members = {"members": [len(m) for m in self.members]} if len(self.members) > 1 else {}  # one run keeps its id
        return {**data_id, **members, "checkpoint_sha256": self.shas, "lr_weights": self.lrs, "layers": self.layers, "top_k": c.top_k,
                "batch_size": c.batch_size, "train_subset": c.train_subset, "test_subset": c.test_subset, "seed": c.seed,
                "self_influence": c.self_influence, "num_shards": c.num_shards, "amp": c.amp, "normalize": c.normalize,
                **score_key, "train_block": c.train_block, "test_block": c.test_block, "factors": self.factor_key}

    def explained_models(self) -> list[dict]:
        """The model each member's lists explain (one run: one), as every output that describes a model names it."""
        return [model_record(self.paths[m[-1]], self.ckpts[m[-1]]) for m in self.members]

    def recorded_args(self) -> dict:
        """The settings as run.json records them: the config with --layers expanded."""
        return {**asdict(self.cfg), "layers": self.layers, "member_sizes": [len(m) for m in self.members]}

    # ------------------------------------------------------------------ factors and scores of a finished run
    def cache_root(self) -> Path:
        return Path(self.cfg.cache_dir or Path(self.cfg.output_dir) / "factors")

    def require_full(self, what: str) -> None:
        """Refuse a run that did not score every training image in one process (a subset or shards)."""
        if self.cfg.train_subset or self.sharded:
            raise UserError(f"{self.results_dir} scored a --train_subset or ran in shards; {what} needs one unsharded run "
                            "over every training image")

    def factors(self) -> FactorSet:
        """The finished run's FactorSet: its scored training rows against every test image, from the factor cache
        (rows the cache lacks are computed and said), built once."""
        if self.sharded:
            raise UserError(f"{self.results_dir} ran in shards, whose factors stay in each shard's folder; this needs one "
                            "unsharded run (efficient_tracin.py without --num_shards)")
        if self._factor_set is None:
            views, computed, _ = factor_views(self.factor_args, self.device, self.ckpts, self.shas, self.train_list,
                                              self.test_list, self.train_ids, np.arange(self.n_test), self.cache_root(),
                                              self.cfg.num_workers)
            if any(computed.values()):
                log.info(f"factor cache completed: {computed} forward batches")
            self.check_factors(views["train"], FactorView(views["test"].caches, self.test_ids))
            self.train_view, self.test_caches = views["train"], views["test"].caches
            self._factor_set = FactorSet(views["train"], views["test"], self.lrs, self.layers,
                                         self.train_list.labels[self.train_ids], self.test_list.labels, self.device,
                                         views["train"].logits(), views["test"].logits(), block=self.cfg.train_block,
                                         curvature_store=curvature_store(views["train"]), members=self.members)
        return self._factor_set

    def check_factors(self, train_view: FactorView, test_view: FactorView) -> None:
        """Refuse factors other than those the finished run read (the digest of their checksums that its run.json
        recorded; a record without one predates it and is not checked)."""
        identity = (self.record or {}).get("identity", {})
        if "factors_sha256" not in identity:
            return
        recorded = identity["factors_sha256"]
        if not (isinstance(recorded, dict) and all(isinstance(recorded.get(k), str) for k in ("train", "test"))):
            raise UserError(f"{self.results_dir}/run.json records no usable digest of its factors (factors_sha256: "
                            f"{str(recorded)[:40]}); rerun efficient_tracin.py --output_dir {self.results_dir}")
        now = {"train": train_view.sha256(), "test": test_view.sha256()}
        differs = [split for split in ("train", "test") if recorded.get(split) != now[split]]
        if differs:
            raise UserError(f"the cached {' and '.join(differs)} factors in {self.cache_root()} are not those the run in "
                            f"{self.results_dir} was scored from (their checksums differ); rerun efficient_tracin.py "
                            f"--output_dir {self.results_dir}")

    def score_args(self, score_fn: str | None = None, normalize: str | None = None, **changes) -> ScoreArguments:
        """ScoreArguments with the run's blocks, damping and trak_dim as recorded (an older record takes the defaults of
        what it lacks) and the method score_fn/normalize (default: the run's own; a record without one ran TracIn)."""
        c = vars(self.cfg)
        if score_fn is None:
            score_fn, normalize = c.get("score_fn") or "tracin", c.get("normalize") or "none"
        kept = {k: c[k] for k in ("damping", "trak_dim", "test_block", "train_block") if c.get(k) not in (None, "")}
        return ScoreArguments(score_fn=score_fn, normalize=normalize or "none", **{**kept, **changes})

    def group(self, test_idx: np.ndarray) -> FactorSet:
        """The run's FactorSet restricted to the test images test_idx (split indices)."""
        fs = self.factors()
        view = FactorView(self.test_caches, np.asarray(test_idx))
        return fs.with_test(view, self.test_list.labels[test_idx], view.logits())

    def topk(self, fs: FactorSet, k: int, score_fn: str | None = None, normalize: str | None = None):
        """The streamed top-k (TopKInfluenceTracker) of a FactorSet's test side, scored as efficient_tracin ranks
        with score_fn/normalize (default: this run's own)."""
        sa = self.score_args(score_fn, normalize, top_k=k)
        views, layers, weights = fs.scoring_views(method_for(sa.score_fn, sa.normalize), sa.damping, sa.trak_dim)
        return score_topk(views["test"], views["train"], fs.n_test, fs.n_train, layers, weights, k, sa.test_block,
                          sa.train_block, self.train_ids, self.device)

    def proponents(self, group: np.ndarray, k: int, score_fn: str = "tracin", normalize: str = "none") -> np.ndarray:
        """(len(group), k) split indices of the top-k proponents of test images `group`, exactly as efficient_tracin
        ranks them with that --score_fn and --normalize."""
        return self.topk(self.group(group), k, score_fn, normalize).proponents()[1].cpu().numpy()

    def features(self, split: str) -> torch.Tensor:
        """The last checkpoint's fc input per image of a split, with the bias column of ones: (n, F + 1)."""
        if "fc" not in self.layers:
            raise UserError(f"knn and --retrain head need the fc layer's factors; the TracIn run scored {', '.join(self.layers)}")
        self.factors()
        view = self.train_view if split == "train" else FactorView(self.test_caches, np.arange(self.n_test))
        return view.load(self.members[0][-1], "fc", slice(None), torch.device("cpu"))[0].double()  # the original run's last

    # ------------------------------------------------------------------ new images
    def models(self) -> list:
        """Every checkpoint's model on the run's device, built once (kept for the next query)."""
        if self._models is None:
            self._models = [model_to_device(model_from_checkpoint(c), self.device) for c in self.ckpts]
        return self._models

    def query_factors(self, x: torch.Tensor, labels: torch.Tensor, steps=None) -> "MemoryView":
        """Factors (a, d) of a batch of transformed images under `labels` at the checkpoints `steps` (default all; a
        last-checkpoint method needs only the last), as a view. The other checkpoints are left empty (NaN logits)."""
        steps = range(len(self.ckpts)) if steps is None else steps
        per_ckpt, logits = [None] * len(self.ckpts), [None] * len(self.ckpts)
        for t in steps:
            with make_hook(self.models()[t], self.factor_args) as hook:
                factors, lg, _ = hook.factors(x.to(self.device), labels.to(self.device))
            per_ckpt[t] = {l: (a.float(), d.float()) for l, (a, d) in factors.items()}
            logits[t] = lg.float().cpu().numpy()
        shape = next(l for l in logits if l is not None).shape
        return MemoryView(per_ckpt, np.stack([np.full(shape, np.nan, np.float32) if l is None else l for l in logits]))

    def last_steps(self) -> list[int]:
        """Each member's last checkpoint (one run: the last checkpoint)."""
        return [m[-1] for m in self.members]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        """The last checkpoint's logits (n, C) of a batch of transformed images (an ensemble: the members' mean)."""
        steps = self.last_steps()
        out = [self.models()[t](x.to(self.device)).float().cpu().numpy() for t in steps]
        return out[0] if len(out) == 1 else np.mean(out, axis=0)


class MemoryView:
    """Factors held in memory, one {layer: (A, D)} per checkpoint, with FactorView's `load` and `logits`."""

    def __init__(self, per_ckpt: list[dict], logits: np.ndarray):
        self.per_ckpt, self._logits = per_ckpt, logits

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        a, d = self.per_ckpt[t][layer]
        return a[rows].to(device), d[rows].to(device)

    def logits(self) -> np.ndarray:
        return self._logits
