"""Exact multi-checkpoint TracIn with the ghost dot-product, streamed top-k and self-influence.

    $ python -m TracIn.efficient_tracin --data_dir data/processed --checkpoint_dir models/checkpoints \
        --output_dir TracIn/results --top_k 100
    $ python TracIn/efficient_tracin.py --train_subset 2000 --test_subset 500 --layers fc fc1

Two stages:
1. factors: every image is read and decoded once; each batch passes through every
   checkpoint's model, and the per-example factors (a, d) of the target linear layers are
   written to memory-mapped .npy files under output_dir/factors/ with per-batch done flags,
   so a killed run resumes where it stopped and gives the same result.
2. scores: blocks of (test x train) TracIn scores, summed over checkpoints *before* the
   top-k (exact TracIn), feed a streaming top-k of proponents and opponents; the full
   n_test x n_train matrix never exists.

Sharding (SLURM arrays, see slurm_tracin.sh): `--num_shards N --shard_index i` scores the
i-th contiguous share of the training set into output_dir/shards/shard_<i>/ (the test
factors are recomputed per shard); `--num_shards N --merge` merges the finished shards
exactly (top-k lists merge, per-image arrays concatenate) into the outputs below.
Do not pass --overwrite to concurrent shard jobs.

Outputs in output_dir: top_k_influences_{values,indices}.npy (proponents, descending),
top_k_opponents_{values,indices}.npy (most negative first), self_influence.npy,
test_indices.npy, train_indices.npy, top_k_influences.csv, run.json. Every index refers
to the full split's order in data/processed/manifest.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.format import open_memmap

from common import UserError, check_run_args, cli, git_commit, nonneg_int, positive_float, positive_int, save_csv, save_json, save_npy
from data_utils import ImageListDataset, build_transform, list_split
from evaluate import autocast, resolve_device
from model_architecture import find_checkpoints, load_checkpoint, model_from_checkpoint
from TracIn.influence_utils import (InfluenceHook, TopKInfluenceTracker, compute_ghost_influence_batch, linear_layers,
                                    self_influence)

log = logging.getLogger(__name__)


@dataclass
class TracInConfig:
    """Validated settings of one TracIn run; each check names the flag to fix."""

    data_dir: str = "data/processed"
    checkpoint_dir: str = "models/checkpoints"
    output_dir: str = "TracIn/results"
    checkpoints: list[str] = field(default_factory=list)
    lr_weights: list[float] = field(default_factory=list)
    layers: list[str] = field(default_factory=lambda: ["fc"])
    top_k: int = 100
    batch_size: int = 32
    train_subset: int = 0
    test_subset: int = 0
    seed: int = 0
    test_block: int = 1024
    train_block: int = 8192
    device: str = "auto"
    num_workers: int = 2
    self_influence: bool = True
    overwrite: bool = False
    shard_index: int = 0
    num_shards: int = 1
    merge: bool = False
    amp: bool = False

    def __post_init__(self):
        if self.top_k < 1:
            raise UserError("--top_k must be >= 1")
        if self.batch_size < 1 or self.test_block < 1 or self.train_block < 1:
            raise UserError("--batch_size, --test_block and --train_block must be >= 1")
        if self.train_subset < 0 or self.test_subset < 0:
            raise UserError("--train_subset/--test_subset must be >= 0 (0 means the whole split)")
        if any(not np.isfinite(w) or w <= 0 for w in self.lr_weights):
            raise UserError("--lr_weights must be positive numbers")
        if not self.layers:
            raise UserError("--layers needs at least one layer name")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise UserError(f"--shard_index must be in [0, --num_shards) (got {self.shard_index} of {self.num_shards})")


def parse_args(argv=None) -> TracInConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--checkpoint_dir", default="models/checkpoints", help="where finetune_epoch_*.pth are (default models/checkpoints)")
    p.add_argument("--output_dir", default="TracIn/results", help="results folder (default TracIn/results)")
    p.add_argument("--checkpoints", nargs="+", default=[], help="checkpoint files to use (default: every finetune_epoch_*.pth, by epoch)")
    p.add_argument("--lr_weights", nargs="+", type=positive_float, default=[], help="lr_t per checkpoint (default: each checkpoint's stored lr)")
    p.add_argument("--layers", nargs="+", default=["fc"], help="target nn.Linear layers, weight and bias (default fc)")
    p.add_argument("--top_k", type=positive_int, default=100, help="proponents and opponents kept per test image (default 100)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="images per forward batch (default 32)")
    p.add_argument("--train_subset", type=nonneg_int, default=0, help="seeded random subset of N training images (default 0: all)")
    p.add_argument("--test_subset", type=nonneg_int, default=0, help="seeded random subset of N test images (default 0: all)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the subsets (default 0)")
    p.add_argument("--test_block", type=positive_int, default=1024, help="test rows per score block (default 1024)")
    p.add_argument("--train_block", type=positive_int, default=8192, help="train columns per score block (default 8192)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="data loader workers (default 2)")
    p.add_argument("--no_self_influence", action="store_true", help="skip self_influence.npy")
    p.add_argument("--overwrite", action="store_true", help="reuse output_dir even if it holds a run with other arguments")
    p.add_argument("--num_shards", type=positive_int, default=1, help="split the training set into N shards (default 1)")
    p.add_argument("--shard_index", type=nonneg_int, default=0, help="which shard this job scores, 0-based (default 0; SLURM_ARRAY_TASK_ID)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the factor pass on CUDA (faster, approximate; default off)")
    p.add_argument("--merge", action="store_true", help="merge the --num_shards finished shards into the final outputs")
    a = p.parse_args(argv)
    return TracInConfig(**{k: v for k, v in vars(a).items() if k != "no_self_influence"}, self_influence=not a.no_self_influence)


# ---------------------------------------------------------------- setup
def choose_subset(n: int, size: int, seed: int) -> np.ndarray:
    """A sorted seeded random subset of range(n) of `size` (0: all of it)."""
    if size == 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def load_checkpoints(cfg: TracInConfig, class_names: list[str]):
    paths = [Path(p) for p in cfg.checkpoints] or find_checkpoints(cfg.checkpoint_dir)
    if not paths:
        raise UserError(f"no checkpoints: no finetune_epoch_*.pth in {cfg.checkpoint_dir} (train first or pass --checkpoints)")
    ckpts = [load_checkpoint(p, class_names=class_names) for p in paths]
    first = ckpts[0]
    for p, c in zip(paths, ckpts):
        if (c["arch"], c["image_size"], c["mean"], c["std"]) != (first["arch"], first["image_size"], first["mean"], first["std"]):
            raise UserError(f"{p} differs from {paths[0]} in arch, image size or normalisation; TracIn needs one model family")
    if cfg.lr_weights and len(cfg.lr_weights) != len(paths):
        raise UserError(f"--lr_weights has {len(cfg.lr_weights)} values for {len(paths)} checkpoints")
    lrs = list(cfg.lr_weights) or [float(c["lr"]) for c in ckpts]
    return paths, ckpts, lrs


# ---------------------------------------------------------------- stage 1: factors
class FactorStore:
    """Memory-mapped per-example factors of one split: A/D per (checkpoint, layer), plus done flags."""

    def __init__(self, root: Path, split: str, n: int, dims: dict[str, tuple[int, int]], n_ckpt: int, n_batches: int):
        self.root, self.split = root, split
        root.mkdir(parents=True, exist_ok=True)
        self.arrays = {}
        for t in range(n_ckpt):
            for layer, (da, dd) in dims.items():
                for kind, width in (("A", da), ("D", dd)):
                    self.arrays[(t, layer, kind)] = self._open(f"{split}_ckpt{t}_{layer}_{kind}.npy", (n, width), np.float32)
        self.loss_last = self._open(f"{split}_loss_last.npy", (n,), np.float32)
        self.pred_last = self._open(f"{split}_pred_last.npy", (n,), np.int64)
        self._last_sync = time.time()
        self.done_path = root / f"{split}_done.npy"
        self.done = np.load(self.done_path) if self.done_path.exists() else np.zeros(n_batches, dtype=bool)
        if len(self.done) != n_batches:
            raise UserError(f"factor cache in {root} does not match this run; pass --overwrite")

    def _open(self, name, shape, dtype):
        path = self.root / name
        if path.exists():
            arr = np.load(path, mmap_mode="r+")
            if arr.shape != shape or arr.dtype != dtype:
                raise UserError(f"factor cache {path} has the wrong shape; pass --overwrite to recompute")
            return arr
        return open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def write(self, rows: slice, t: int, factors: dict, loss=None, pred=None):
        for layer, (a, d) in factors.items():
            self.arrays[(t, layer, "A")][rows] = a.float().cpu().numpy()
            self.arrays[(t, layer, "D")][rows] = d.float().cpu().numpy()
        if loss is not None:
            self.loss_last[rows] = loss.float().cpu().numpy()
            self.pred_last[rows] = pred.cpu().numpy()

    def mark_done(self, b: int, force: bool = False, every_s: float = 10.0):
        """Record batch b as done; flags reach disk (after the factors) at most every `every_s` seconds."""
        self.done[b] = True
        if force or time.time() - self._last_sync >= every_s:
            self.sync()

    def sync(self):
        """Flush the factors, then the done flags: a flag on disk never claims unwritten rows."""
        for arr in list(self.arrays.values()) + [self.loss_last, self.pred_last]:
            arr.flush()
        save_npy(self.done_path, self.done)
        self._last_sync = time.time()

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.from_numpy(np.ascontiguousarray(self.arrays[(t, layer, k)][rows])).to(device) for k in ("A", "D"))

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def resident(self, device) -> "ResidentFactors":
        """All factors copied once to `device` (the GPU fast path: no host transfer per block)."""
        return ResidentFactors({key: torch.from_numpy(np.asarray(a)).to(device) for key, a in self.arrays.items()})


class ResidentFactors:
    """Factors held as device tensors, with FactorStore's `load` interface."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[(t, layer, "A")][rows], self.tensors[(t, layer, "D")][rows]


def layer_dims(model, layers) -> dict[str, tuple[int, int]]:
    mods = dict(model.named_modules())
    return {l: (mods[l].in_features + (mods[l].bias is not None), mods[l].out_features) for l in layers}


def extract_factors(store: FactorStore, models, layers, dataset, batch_size, num_workers, device, desc, stop_after=None,
                    amp: bool = False) -> int:
    """Stage 1 for one split; returns the number of batches computed now (not cached)."""
    from tqdm import tqdm

    n = len(dataset)
    todo = [b for b in range(len(store.done)) if not store.done[b]]
    if not todo:
        return 0
    batches = [list(range(b * batch_size, min((b + 1) * batch_size, n))) for b in todo]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    done_now = 0
    with contextlib.ExitStack() as stack:
        hooks = [stack.enter_context(InfluenceHook(m, layers)) for m in models]
        stack.callback(store.sync)  # persist progress on any exit, Ctrl-C included
        for b, (x, y, _) in zip(todo, tqdm(loader, desc=desc, total=len(todo), disable=None)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            rows = slice(b * batch_size, b * batch_size + len(y))
            for t, hook in enumerate(hooks):  # the batch visits every checkpoint before the next is read
                with autocast(device) if amp else contextlib.nullcontext():
                    factors, logits, loss = hook.factors(x, y)
                last = t == len(hooks) - 1
                store.write(rows, t, factors, loss if last else None, logits.argmax(1) if last else None)
            done_now += 1
            stopping = stop_after is not None and done_now >= stop_after
            store.mark_done(b, force=stopping or b == todo[-1])
            if stopping:
                raise KeyboardInterrupt("stopped on request (test hook)")
    return done_now


# ---------------------------------------------------------------- stage 2: scores
def score_topk(test_store: FactorStore, train_store: FactorStore, n_test: int, n_train: int, layers, lrs,
               top_k: int, test_block: int, train_block: int, train_ids: np.ndarray, device) -> TopKInfluenceTracker:
    """Blocked exact TracIn + streaming top-k; train_ids maps local train rows to split indices."""
    n_ckpt = len(lrs)
    tracker = TopKInfluenceTracker(n_test, top_k, device=device)
    ids = torch.from_numpy(train_ids).to(device)
    for r0 in range(0, n_test, test_block):
        rows = slice(r0, min(r0 + test_block, n_test))
        te = [{l: test_store.load(t, l, rows, device) for l in layers} for t in range(n_ckpt)]
        for c0 in range(0, n_train, train_block):
            cols = slice(c0, min(c0 + train_block, n_train))
            tr = [{l: train_store.load(t, l, cols, device) for l in layers} for t in range(n_ckpt)]
            tracker.update(compute_ghost_influence_batch(te, tr, lrs), ids[cols], rows=rows)
    return tracker


def self_influence_from_store(store: FactorStore, n: int, layers, lrs, block: int, device) -> np.ndarray:
    """influence_utils.self_influence over row blocks of a factor store, accumulated in float64."""
    out = np.zeros(n, dtype=np.float64)
    for c0 in range(0, n, block):
        rows = slice(c0, min(c0 + block, n))
        factors = [{l: tuple(x.double() for x in store.load(t, l, rows, device)) for l in layers} for t in range(len(lrs))]
        out[rows] = self_influence(factors, lrs).cpu().numpy()
    return out.astype(np.float32)


# ---------------------------------------------------------------- the run
def run(cfg: TracInConfig, _stop_after_batches: int | None = None) -> dict:
    """One unsharded run, one shard (--num_shards > 1), or the merge of finished shards (--merge)."""
    t_start = time.time()
    device = resolve_device(cfg.device)
    train_list, test_list = list_split(cfg.data_dir, "train"), list_split(cfg.data_dir, "test")
    if train_list.class_names != test_list.class_names:
        raise UserError(f"train and test class folders differ in {cfg.data_dir}")
    paths, ckpts, lrs = load_checkpoints(cfg, train_list.class_names)
    train_ids = choose_subset(len(train_list.paths), cfg.train_subset, cfg.seed)
    test_ids = choose_subset(len(test_list.paths), cfg.test_subset, cfg.seed + 1)
    if cfg.top_k > len(train_ids):
        raise UserError(f"--top_k {cfg.top_k} is larger than the {len(train_ids)} training images scored; lower --top_k")
    # Shards are whole units of lcm(batch_size, train_block) images, so every forward batch and
    # every score block is the one the unsharded run computes: the merge is bit-identical.
    unit = math.lcm(cfg.batch_size, cfg.train_block)
    n_units = -(-len(train_ids) // unit)
    if cfg.num_shards > n_units:
        raise UserError(f"--num_shards {cfg.num_shards} is more than the {n_units} shard unit(s) of lcm(--batch_size, --train_block) "
                        f"= {unit} training images; lower --train_block or --num_shards")

    out = Path(cfg.output_dir)
    identity = {"data_dir": str(Path(cfg.data_dir).resolve()), "checkpoints": [str(p.resolve()) for p in paths],
                "lr_weights": lrs, "layers": cfg.layers, "top_k": cfg.top_k, "batch_size": cfg.batch_size,
                "train_subset": cfg.train_subset, "test_subset": cfg.test_subset, "seed": cfg.seed,
                "self_influence": cfg.self_influence, "num_shards": cfg.num_shards, "amp": cfg.amp,
                "n_train_split": len(train_list.paths), "n_test_split": len(test_list.paths)}
    if cfg.num_shards > 1:
        identity.update(train_block=cfg.train_block, test_block=cfg.test_block)
    check_run_args(out, identity, cfg.overwrite)
    if cfg.overwrite and (out / "run_args.json").exists() and json.loads((out / "run_args.json").read_text()) != json.loads(json.dumps(identity)):
        shutil.rmtree(out / "factors", ignore_errors=True)
        shutil.rmtree(out / "shards", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "run_args.json", identity)

    if cfg.merge:
        parts, test_pred, timings = merge_shards(out, cfg.num_shards, device)
        tracker = parts.pop("tracker")
        summary_extra = {"seconds_factors": timings, "batches_computed": "merged"}
    else:
        units = np.array_split(np.arange(n_units), cfg.num_shards)[cfg.shard_index]
        shard_ids = train_ids[units[0] * unit: (units[-1] + 1) * unit] if cfg.num_shards > 1 else train_ids
        work_dir = out / "shards" / f"shard_{cfg.shard_index:03d}" if cfg.num_shards > 1 else out
        tracker, parts, test_pred, summary_extra = compute(cfg, device, ckpts, lrs, train_list, test_list, shard_ids,
                                                           test_ids, work_dir, _stop_after_batches)
        if cfg.num_shards > 1:
            for name in ("prop_values", "prop_indices", "opp_values", "opp_indices"):
                save_npy(work_dir / f"{name}.npy", tracker.state()[name].numpy())
            for name in ("self_influence", "train_ids", "loss_last", "pred_last"):
                if parts.get(name) is not None:
                    save_npy(work_dir / f"{name}.npy", parts[name])
            save_npy(work_dir / "test_pred.npy", test_pred)
            save_json(work_dir / "complete.json", {"shard_index": cfg.shard_index, "n_train": len(shard_ids),
                                                   "seconds": time.time() - t_start})
            log.info(f"TracIn shard {cfg.shard_index + 1}/{cfg.num_shards}: {len(shard_ids)} train x {len(test_ids)} test "
                     f"in {time.time() - t_start:.1f}s; run with --merge once every shard is done")
            return {"shard_index": cfg.shard_index, "n_train": len(shard_ids), **summary_extra}

    return write_outputs(cfg, out, tracker, parts, test_pred, train_list, test_list, train_ids, test_ids,
                         paths, ckpts, lrs, device, t_start, summary_extra)


def fits_on_device(stores: dict, device) -> bool:
    """GPU fast path: hold every factor on the device when they take under half its free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(s.nbytes() for s in stores.values()) < 0.5 * free


def compute(cfg, device, ckpts, lrs, train_list, test_list, train_ids, test_ids, work_dir: Path, stop_after=None):
    """Stages 1 and 2 for the given training ids; factors cached under work_dir/factors."""
    models = [model_from_checkpoint(c).to(device) for c in ckpts]  # every checkpoint resident at once
    if device.type == "cuda":
        models = [m.to(memory_format=torch.channels_last) for m in models]
    bad = [l for l in cfg.layers if l not in linear_layers(models[0])]
    if bad:
        raise UserError(f"--layers {' '.join(bad)}: not linear layers of {ckpts[0]['arch']} (linear layers: {', '.join(linear_layers(models[0]))})")
    dims = layer_dims(models[0], cfg.layers)
    ck = ckpts[0]
    tf = build_transform(ck["image_size"], train=False, mean=ck["mean"], std=ck["std"])
    stores, computed = {}, {}
    t0 = time.time()
    for split, listing, ids in (("train", train_list, train_ids), ("test", test_list, test_ids)):
        n_batches = -(-len(ids) // cfg.batch_size)
        stores[split] = FactorStore(work_dir / "factors", split, len(ids), dims, len(models), n_batches)
        computed[split] = extract_factors(stores[split], models, cfg.layers, ImageListDataset(listing, tf, ids),
                                          cfg.batch_size, cfg.num_workers, device, f"factors {split}", stop_after,
                                          amp=cfg.amp and device.type == "cuda")
    t_factors = time.time() - t0
    t0 = time.time()
    scoring = {k: v.resident(device) for k, v in stores.items()} if fits_on_device(stores, device) else stores
    tracker = score_topk(scoring["test"], scoring["train"], len(test_ids), len(train_ids), cfg.layers, lrs, cfg.top_k,
                         cfg.test_block, cfg.train_block, train_ids, device)
    self_inf = self_influence_from_store(scoring["train"], len(train_ids), cfg.layers, lrs, cfg.train_block, device) if cfg.self_influence else None
    parts = {"self_influence": self_inf, "train_ids": np.asarray(train_ids, dtype=np.int64),
             "loss_last": np.asarray(stores["train"].loss_last, dtype=np.float32),
             "pred_last": np.asarray(stores["train"].pred_last, dtype=np.int64)}
    extra = {"seconds_factors": t_factors, "seconds_scores": time.time() - t0, "batches_computed": computed,
             "layer_dims": {l: list(d) for l, d in dims.items()}}
    return tracker, parts, np.asarray(stores["test"].pred_last), extra


def merge_shards(out: Path, num_shards: int, device):
    """Exact merge: top-k trackers merge, per-image arrays concatenate in shard order."""
    if num_shards < 2:
        raise UserError("--merge needs --num_shards N (N >= 2), the number of shards that were run")
    dirs = [out / "shards" / f"shard_{i:03d}" for i in range(num_shards)]
    missing = [d.name for d in dirs if not (d / "complete.json").exists()]
    if missing:
        raise UserError(f"shard(s) {', '.join(missing)} in {out / 'shards'} are not finished; run them before --merge")
    tracker, parts = None, {k: [] for k in ("self_influence", "train_ids", "loss_last", "pred_last")}
    for d in dirs:
        state = {k: torch.from_numpy(np.load(d / f"{k}.npy")) for k in ("prop_values", "prop_indices", "opp_values", "opp_indices")}
        t = TopKInfluenceTracker.from_state(state, device=device)
        tracker = t if tracker is None else tracker.merge(t)
        for k in parts:
            if (d / f"{k}.npy").exists():
                parts[k].append(np.load(d / f"{k}.npy"))
    merged = {k: (np.concatenate(v) if v else None) for k, v in parts.items()}
    merged["tracker"] = tracker
    seconds = sum(json.loads((d / "complete.json").read_text())["seconds"] for d in dirs)
    return merged, np.load(dirs[0] / "test_pred.npy"), seconds


def write_outputs(cfg, out, tracker, parts, test_pred, train_list, test_list, train_ids, test_ids, paths, ckpts, lrs,
                  device, t_start, extra) -> dict:
    prop_v, prop_i = (x.cpu().numpy() for x in tracker.proponents())
    opp_v, opp_i = (x.cpu().numpy() for x in tracker.opponents())
    save_npy(out / "top_k_influences_values.npy", prop_v.astype(np.float32))
    save_npy(out / "top_k_influences_indices.npy", prop_i.astype(np.int64))
    save_npy(out / "top_k_opponents_values.npy", opp_v.astype(np.float32))
    save_npy(out / "top_k_opponents_indices.npy", opp_i.astype(np.int64))
    save_npy(out / "test_indices.npy", test_ids.astype(np.int64))
    save_npy(out / "train_indices.npy", train_ids.astype(np.int64))
    if parts.get("self_influence") is not None:
        # indexed like train_indices.npy (the full split when no --train_subset)
        save_npy(out / "self_influence.npy", parts["self_influence"].astype(np.float32))
        save_npy(out / "train_loss_last.npy", parts["loss_last"].astype(np.float32))
        save_npy(out / "train_pred_last.npy", parts["pred_last"].astype(np.int64))

    names = np.asarray(train_list.class_names)
    frames = []
    for kind, values, indices in (("proponent", prop_v, prop_i), ("opponent", opp_v, opp_i)):
        k = values.shape[1]
        frames.append(pd.DataFrame({
            "test_idx": np.repeat(test_ids, k),
            "test_path": np.repeat(np.asarray(test_list.paths)[test_ids], k),
            "test_label": np.repeat(names[test_list.labels[test_ids]], k),
            "test_pred": np.repeat(names[test_pred], k),
            "kind": kind,
            "rank": np.tile(np.arange(1, k + 1), len(test_ids)),
            "train_idx": indices.ravel(),
            "train_path": np.asarray(train_list.paths)[indices.ravel()],
            "train_label": names[train_list.labels[indices.ravel()]],
            "influence": values.ravel(),
        }))
    save_csv(out / "top_k_influences.csv", pd.concat(frames).sort_values(["test_idx", "kind", "rank"], ascending=[True, False, True]))

    pairs = len(train_ids) * len(test_ids)
    neg_share = float((opp_v < 0).mean())
    summary = {
        "pairs_scored": pairs, "n_train": len(train_ids), "n_test": len(test_ids), "n_checkpoints": len(ckpts),
        "seconds_total": time.time() - t_start, "opponent_negative_share": neg_share,
        "proponent_negative_share": float((prop_v < 0).mean()), **extra,
    }
    save_json(out / "run.json", {
        "args": asdict(cfg), "git_commit": git_commit(), "device": str(device),
        "checkpoints": [{"path": str(p), "epoch": c["epoch"], "lr": lr} for p, c, lr in zip(paths, ckpts, lrs)],
        "layers": cfg.layers, "summary": summary,
    })
    log.info(f"TracIn: {pairs:,} pairs scored ({len(test_ids)} test x {len(train_ids)} train, {len(ckpts)} checkpoints, "
             f"layers {','.join(cfg.layers)}) in {summary['seconds_total']:.1f}s; "
             f"negative share among opponents {neg_share:.1%}; outputs in {out}")
    return summary


def main(argv=None):
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    cli(main)
