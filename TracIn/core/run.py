"""The run object: one TracIn run's inputs resolved once, and the factors and scores every tool takes from it.

    from TracIn.core.run import InfluenceRun
    run = InfluenceRun.from_config(TracInConfig(top_k=20))            # a new run: efficient_tracin's job
    scored = run.score(run.cfg.score_args(), run.train_ids, run.cache_root())   # stages 1 and 2 (a ScoredRun)
    run = InfluenceRun.from_results("TracIn/results")                 # a finished run: lds, counterfactual, notebooks
    fs = run.factors()                                                 # methods.FactorSet over every scored row
    lists = run.recompute_proponents(np.array([4, 17]), k=10, score_fn="influence_last")   # (2, 10) split indices
    tracker, view = run.query(x, labels, k=10)                         # new images vs the cached training side

The named constructors do the I/O and the checks, once, for the CLI (job.py), the shards and merge, the LDS, the
counterfactual check, clean-and-retrain and the notebook API (api.py): they read the two splits and check their
classes, pick the scored rows (--train_subset/--test_subset), load the checkpoints (one model family, lr_t, sha256 of
each file), build each checkpoint's model, expand --layers to modules and check each projection (one hook: its
sizes and the factor key). A finished run is reopened with the settings its run.json recorded (fields it lacks take
TracInConfig's defaults; the device and loader workers are this machine's: given, or TracInConfig's), its checkpoints
checked unchanged. The constructor itself only holds what it is given (TRAK's TRAKer style), so a benchmark builds a
run from synthetic factors and random models (bench/bench_explain.py).
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from lib.checkpoints import model_from_checkpoint, model_record
from lib.cli import UserError
from lib.data_utils import check_manifest, data_identity, list_split
from lib.devices import model_to_device, resolve_device
from lib.prediction import logit_figures
from lib.timing import Phases
from TracIn.core.arguments import ScoreArguments, TracInConfig, pick
from TracIn.core.factors import FactorView, choose_subset, curvature_store, factor_views, load_checkpoints, make_hook
from TracIn.core.methods import FactorSet, method_for
from TracIn.core.results import TracInResults, check_data, load_results, recorded_data_dir
from TracIn.core.scores import ScoredRun, score_factor_set
from TracIn.core.topk import TopKInfluenceTracker
from TracIn.core.ghost import target_layers

log = logging.getLogger(__name__)


def check_curvature_size(method, dims: dict) -> None:
    """A K-FAC curvature holds an (A x A) and a (D x D) float64 matrix per layer; an unprojected conv layer's A is its
    whole gradient (--proj_dim 0), whose square would exhaust any memory. Refused with the flags that fit."""
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


def fits_on_device(views: dict, device) -> bool:
    """GPU fast path: hold every factor on the device when they take under half its free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(v.nbytes() for v in views.values()) < 0.5 * free


def open_results(results_dir, data_dir=None) -> tuple[TracInResults, str]:
    """A finished run's results, loaded once and checked against data_dir (default: the data it recorded, checked
    unchanged); (results, data_dir)."""
    results = load_results(results_dir)
    data_dir = str(data_dir or recorded_data_dir(results.record))
    check_data(results.record, data_dir, results_dir)
    return results, data_dir


class InfluenceRun:
    """One run's inputs, as given (no I/O). cfg: the TracInConfig (its settings: identity, score arguments, cache);
    device; train_list, test_list (SplitListing); train_ids, test_ids (the scored split indices); paths, ckpts, lrs,
    shas (per checkpoint), members (each training run's checkpoint indices), chosen (how they were chosen, in words);
    models (each checkpoint's model, put on the device on first use); factor_args (FactorArguments, layers expanded);
    dims (the hook's (A, D) widths per layer) and factor_key (what the cached factors depend on); results (the
    TracInResults of a finished run, else None); factor_set (a FactorSet to score against instead of the factor cache).
    Named constructors: from_config (a new run), from_results (a finished one)."""

    def __init__(self, cfg: TracInConfig, *, device, models: list, lrs: list, members: list[list[int]], factor_args,
                 train_ids: np.ndarray, test_ids: np.ndarray | None = None, train_list=None, test_list=None, paths=(),
                 ckpts=(), shas=(), chosen: str = "", dims: dict | None = None, factor_key: dict | None = None,
                 results: TracInResults | None = None, factor_set: FactorSet | None = None):
        self.cfg, self.device = cfg, device
        self.train_list, self.test_list, self.train_ids, self.test_ids = train_list, test_list, train_ids, test_ids
        self.paths, self.ckpts, self.lrs, self.shas = list(paths), list(ckpts), list(lrs), list(shas)
        self.members, self.chosen = members, chosen
        self.factor_args, self.layers, self.dims, self.factor_key = factor_args, list(factor_args.layers), dims, factor_key
        self.results = results
        self.record = None if results is None else results.record
        self.results_dir = None if results is None else Path(results.path)
        self.sharded = results is not None and results.record["args"].get("num_shards", 1) > 1
        self._models, self._on_device, self._factor_set = list(models), False, factor_set

    @property
    def n_train(self) -> int:
        return len(self.train_list.paths)

    @property
    def n_test(self) -> int:
        return len(self.test_list.paths)

    @classmethod
    def from_config(cls, cfg: TracInConfig, splits=None, results: TracInResults | None = None) -> "InfluenceRun":
        """A run of cfg: its splits (splits: the two SplitListings of cfg.data_dir already listed) checked, its
        checkpoints loaded and checked, its models built, --layers expanded and each layer's projection checked."""
        device = resolve_device(cfg.device)  # a bad --device is the first thing said
        train_list, test_list = splits or (list_split(cfg.data_dir, "train"), list_split(cfg.data_dir, "test"))
        if train_list.class_names != test_list.class_names:
            raise UserError(f"train and test class folders differ in {cfg.data_dir}")
        check_manifest(cfg.data_dir, {"train": train_list, "test": test_list})
        paths, ckpts, lrs, shas, members, chosen = load_checkpoints(cfg, train_list.class_names)
        train_ids = choose_subset(len(train_list.paths), cfg.train_subset, cfg.seed)
        test_ids = choose_subset(len(test_list.paths), cfg.test_subset, cfg.seed + 1)
        models = [model_from_checkpoint(c) for c in ckpts]
        try:  # blocks expand to their layers
            layers = target_layers(models[0], cfg.layers)
        except ValueError as e:
            raise UserError(f"--layers: {e}") from None
        factor_args = replace(cfg.factor_args(), layers=tuple(layers))
        try:  # each layer's projection checked against its width; the one hook built for its sizes
            hook = make_hook(models[0], factor_args)
        except ValueError as e:
            raise UserError(str(e)) from None
        check_curvature_size(method_for(cfg.score_fn, cfg.normalize), hook.dims)
        return cls(cfg, device=device, models=models, lrs=lrs, members=members, factor_args=factor_args, train_ids=train_ids,
                   test_ids=test_ids, train_list=train_list, test_list=test_list, paths=paths, ckpts=ckpts, shas=shas,
                   chosen=chosen, dims=hook.dims, factor_key=factor_args.key(projected=any(hook.projected.values())),
                   results=results)

    @classmethod
    def from_results(cls, results_dir, data_dir=None, device=None, num_workers: int | None = None, *,
                     results: TracInResults | None = None, splits=None) -> "InfluenceRun":
        """The run in results_dir (efficient_tracin's --output_dir) with the settings its run.json recorded (TracInConfig's
        defaults for fields it lacks), on data_dir (default: the data it recorded, checked unchanged), its checkpoints
        checked unchanged. device and num_workers: this machine's (default TracInConfig's). results (with splits): the
        results already loaded by open_results(results_dir, data_dir) and data_dir's two SplitListings, not read again."""
        if results is None:
            results, data_dir = open_results(results_dir, data_dir)
        rec = results.record
        cfg = pick(TracInConfig, {
            **rec["args"], "output_dir": str(results_dir), "data_dir": str(data_dir),
            "device": TracInConfig.device if device is None else str(device),
            "num_workers": TracInConfig.num_workers if num_workers is None else num_workers, "overwrite": False,
            "checkpoints": [c["path"] for c in rec["checkpoints"]], "lr_weights": [c["lr"] for c in rec["checkpoints"]],
            "num_shards": 1, "shard_index": 0, "merge": False, "members": [],
            "member_sizes": rec["args"].get("member_sizes") or [len(rec["checkpoints"])]})
        run = cls.from_config(cfg, splits, results)
        changed = [str(p) for p, s, c in zip(run.paths, run.shas, rec["checkpoints"]) if s != c["sha256"]]
        if changed:
            raise UserError(f"checkpoint(s) {', '.join(changed)} changed since the TracIn run in {results_dir}; rerun "
                            "efficient_tracin.py")
        if not np.array_equal(run.train_ids, np.asarray(results["train_indices"])) or \
                not np.array_equal(run.test_ids, np.asarray(results["test_indices"])):
            raise UserError(f"{results_dir}'s train/test indices do not match its recorded subset settings; rerun efficient_tracin.py")
        return run

    # ------------------------------------------------------------------ identity
    def identity(self, data_id: dict | None = None) -> dict:
        """What a run's scores depend on, before stage 1 (its factors' cache key; results.tracin_outputs adds the
        digest of the factors read, ScoredRun.factors_sha256); results.run_id hashes it."""
        c = self.cfg
        data_id = data_id if data_id is not None else data_identity(c.data_dir)
        score_key = c.score_args().key()
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

    # ------------------------------------------------------------------ stages 1 and 2
    def cache_root(self) -> Path:
        return Path(self.cfg.cache_dir or Path(self.cfg.output_dir) / "factors")

    def factor_views(self, train_ids: np.ndarray, test_ids: np.ndarray, cache_root: Path, phases: Phases) -> tuple[dict, dict]:
        """Stage 1 (factors.factor_views) with the run's models, hook sizes and factor key; the models put on the device
        count as seconds_models."""
        with phases("seconds_models"):
            models = self.models()
        return factor_views(self.factor_args, models, self.dims, self.factor_key, self.device, self.ckpts, self.shas,
                            self.train_list, self.test_list, train_ids, test_ids, cache_root, self.cfg.num_workers, phases)

    def _factor_set_of(self, views: dict, block: int, resident: bool = False) -> FactorSet:
        """The FactorSet of stage 1's views (resident: every factor copied to the device first, the GPU fast path)."""
        scoring = {k: v.resident(self.device) for k, v in views.items()} if resident else views
        return FactorSet(scoring["train"], scoring["test"], self.lrs, self.layers, self.train_list.labels[views["train"].ids],
                         self.test_list.labels[views["test"].ids], self.device, views["train"].logits(),
                         views["test"].logits(), block=block, curvature_store=curvature_store(views["train"]),
                         members=self.members)

    def score(self, score_args: ScoreArguments, train_ids: np.ndarray, cache_root: Path) -> ScoredRun:
        """Stages 1 and 2 for the training rows train_ids (the run's, or one shard's) against the run's test rows,
        factors cached under cache_root; an ensemble's scores, self-influence and last-checkpoint arrays are member
        means. Its summary holds the forward batches run, the layer dims and the seconds of each phase: seconds_factors
        (of which seconds_models, seconds_forward_backward, seconds_cache_writes) and seconds_scores."""
        phases = Phases()
        with phases("seconds_factors"):
            views, computed = self.factor_views(train_ids, self.test_ids, cache_root, phases)
        with phases("seconds_scores"):
            fs = self._factor_set_of(views, score_args.train_block, resident=fits_on_device(views, self.device))
            tracker, sq_norms = score_factor_set(fs, score_args, train_ids)
            steps, weights = fs.checkpoint_weights()
            self_inf = None if sq_norms is None else (np.asarray(weights, dtype=np.float64) @ sq_norms).astype(np.float32)
            loss, margin, el2n = logit_figures(fs.train_logits, self.train_list.labels[train_ids])  # (n_ckpt, n_rows, C)
            last = fs.checkpoint_weights(last_only=True)[0]  # each member's last checkpoint (one run: the last)
            train_arrays = {"self_influence": self_inf, "train_ids": np.asarray(train_ids, dtype=np.int64),
                            "loss_last": loss[last].mean(0) if len(last) > 1 else loss[last[0]],
                            "pred_last": fs.train_logits[last].mean(0).argmax(1).astype(np.int64),
                            "loss_per_ckpt": loss, "margin_per_ckpt": margin, "el2n_per_ckpt": el2n,
                            "grad_sq_norm_per_ckpt": None if sq_norms is None else sq_norms.astype(np.float32)}
            test_pred = fs.test_logits[last].mean(0).argmax(1).astype(np.int64)  # the members' mean logits
        summary = {**phases, "batches_computed": computed, "layer_dims": {l: list(d) for l, d in self.dims.items()}}
        return ScoredRun(tracker, train_arrays, test_pred, summary, {split: v.sha256() for split, v in views.items()})

    # ------------------------------------------------------------------ factors and scores of a finished run

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
            views, computed = self.factor_views(self.train_ids, np.arange(self.n_test), self.cache_root(), Phases())
            if any(computed.values()):
                log.info(f"factor cache completed: {computed} forward batches")
            self.check_factors(views["train"], FactorView(views["test"].caches, self.test_ids))
            self.train_view, self.test_caches = views["train"], views["test"].caches
            self._factor_set = self._factor_set_of(views, self.cfg.train_block)
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
        """The run's ScoreArguments (its blocks, damping and trak_dim as configured or recorded) with the method
        score_fn/normalize (default: the run's own) and any other field changed."""
        if score_fn is None:
            score_fn, normalize = self.cfg.score_fn, self.cfg.normalize
        return replace(self.cfg.score_args(), score_fn=score_fn, normalize=normalize or "none", **changes)

    def group(self, test_idx: np.ndarray) -> FactorSet:
        """The run's FactorSet restricted to the test images test_idx (split indices)."""
        fs = self.factors()
        view = FactorView(self.test_caches, np.asarray(test_idx))
        return fs.with_test(view, self.test_list.labels[test_idx], view.logits())

    def topk(self, fs: FactorSet, k: int, score_fn: str | None = None, normalize: str | None = None) -> TopKInfluenceTracker:
        """The streamed top-k of a FactorSet's test side against the run's training rows, scored as efficient_tracin
        ranks (scores.score_factor_set) with score_fn/normalize (default: this run's own)."""
        return score_factor_set(fs, self.score_args(score_fn, normalize, top_k=k, self_influence=False), self.train_ids)[0]

    def recompute_proponents(self, group: np.ndarray, k: int, score_fn: str | None = None,
                             normalize: str | None = None) -> np.ndarray:
        """(len(group), k) split indices of the top-k proponents of test images `group`, recomputed from the factors
        exactly as efficient_tracin ranks them with that --score_fn and --normalize (default: the run's own)."""
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
        """Every checkpoint's model on the run's device (put there on first use, kept for the next query)."""
        if not self._on_device:
            self._models, self._on_device = [model_to_device(m, self.device) for m in self._models], True
        return self._models

    def query(self, x: torch.Tensor, labels: np.ndarray, k: int, score_fn: str | None = None, normalize: str | None = None,
              phases: Phases | None = None) -> tuple[TopKInfluenceTracker, "MemoryView"]:
        """New images against the run's training factors: the streamed top-k of a batch of transformed images x under
        labels (class indices), scored with score_fn/normalize (default: the run's own), and their factors' view (its
        logits at the checkpoints the method needs). phases: the query's forward/backward passes add seconds_model."""
        sa = self.score_args(score_fn, normalize)
        steps = self.last_steps() if method_for(sa.score_fn, sa.normalize).last_only else None
        with (Phases() if phases is None else phases)("seconds_model"):
            view = self.query_factors(x, torch.from_numpy(labels), steps)
        return self.topk(self.factors().with_test(view, labels, view.logits()), k, sa.score_fn, sa.normalize), view

    def query_factors(self, x: torch.Tensor, labels: torch.Tensor, steps=None) -> "MemoryView":
        """Factors (a, d) of a batch of transformed images under `labels` at the checkpoints `steps` (default all; a
        last-checkpoint method needs only the last), as a view. The other checkpoints are left empty (NaN logits)."""
        steps = range(len(self.lrs)) if steps is None else steps
        per_ckpt, logits = [None] * len(self.lrs), [None] * len(self.lrs)
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
