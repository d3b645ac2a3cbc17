"""Exact multi-checkpoint TracIn with the ghost dot-product, streamed top-k and self-influence.

    $ python -m TracIn.efficient_tracin --data_dir data/processed --checkpoint_dir models/checkpoints \
        --output_dir TracIn/results --top_k 100
    $ python -m TracIn.efficient_tracin --top_k 20 --test_subset 200    # re-scores from the cache: no forward pass

Two stages, each with its own identity:
1. factors: each image is decoded once per run and passed through every checkpoint's model;
   the per-example factors (a, d) of the target linear layers and the logits are cached in
   output_dir/factors/<split>-<image list key>/<checkpoint sha256>-<layers key>/ as
   memory-mapped .npy over the *whole* split with per-row done flags. The image list key
   hashes every file's path, label, size and mtime; the checkpoint key is a hash of the file's
   bytes. So any subset reuses rows already computed, a new checkpoint costs only its own
   forward passes, and a retrained checkpoint or re-prepared data can never reuse a stale
   cache. A killed run resumes where it stopped and gives the same result.
2. scores: blocks of (test x train) TracIn scores, summed over checkpoints *before* the
   top-k (exact TracIn), feed a streaming top-k of proponents and opponents; the full
   n_test x n_train matrix never exists. Changing --top_k, --lr_weights, --checkpoints or a
   subset re-scores from the cache; no --overwrite is needed.

Sharding (SLURM arrays, see slurm_tracin.sh): `--num_shards N --shard_index i` scores the
i-th contiguous share of the training set into output_dir/shards/shard_<i>/ (with its own
factor cache; the test factors are computed per shard); `--num_shards N --merge` merges
the finished shards exactly (top-k lists merge, per-image arrays concatenate).

Outputs in output_dir are written through TracIn/results.py (one run at a time, run.json
last): top_k_influences_{values,indices}.npy, top_k_opponents_{values,indices}.npy,
test_indices.npy, train_indices.npy, test_pred.npy, self_influence.npy, train_loss_last.npy,
train_pred_last.npy, train_{loss,margin}_per_ckpt.npy, top_k_influences.csv, run.json. Every
index refers to the full split's order in data/processed/manifest.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.format import open_memmap

from common import (OWNER_MARKER, file_sha256, is_relative_to, load_npy, read_json, remove_inside_owned, UserError, autocast, cli, ensure_output_dir, git_commit, mark_owned, nonneg_int, owned_by,
                    positive_float, positive_int, remove_owned, resolve_device, save_json, save_npy)
from data_utils import ImageListDataset, data_identity, eval_transform, list_split, listing_key
from model_architecture import batch_to_device, find_checkpoints, load_checkpoint, model_from_checkpoint, model_to_device
from TracIn.influence_utils import (InfluenceHook, TopKInfluenceTracker, compute_ghost_influence_batch, target_layers,
                                    self_influence)
from TracIn.results import ARRAYS, RECORD, TABLES, check_writable_names, write_run

log = logging.getLogger(__name__)
TOOL = "efficient_tracin"
NORMALIZE = ("none", "train", "both")


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
    normalize: str = "train"
    cache_dir: str = ""
    proj_dim: int = 16
    proj_seed: int = 0
    project_linear: bool = False

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
        if self.proj_dim < 0:
            raise UserError("--proj_dim must be >= 0 (0: no projection, the exact per-example gradient)")
        if self.normalize not in NORMALIZE:
            raise UserError(f"--normalize {self.normalize!r}: choose one of {', '.join(NORMALIZE)}")
        if self.cache_dir and self.num_shards > 1:
            raise UserError("--cache_dir is for unsharded runs; each shard keeps its factors in its own folder")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise UserError(f"--shard_index must be in [0, --num_shards) (got {self.shard_index} of {self.num_shards})")


def parse_args(argv=None) -> TracInConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--checkpoint_dir", default="models/checkpoints", help="where finetune_epoch_*.pth are (default models/checkpoints)")
    p.add_argument("--output_dir", default="TracIn/results", help="results folder (default TracIn/results)")
    p.add_argument("--checkpoints", nargs="+", default=[], help="checkpoint files to use (default: every finetune_epoch_*.pth, by epoch)")
    p.add_argument("--lr_weights", nargs="+", type=positive_float, default=[], help="lr_t per checkpoint (default: each checkpoint's stored lr)")
    p.add_argument("--layers", nargs="+", default=["fc"],
                   help="target layers: nn.Linear / nn.Conv2d module names or blocks holding them (layer4 = every conv in it); "
                        "weights and biases (default fc)")
    p.add_argument("--proj_dim", type=nonneg_int, default=16,
                   help="R: conv gradients are projected to R x R per layer from both sides (Kronecker, unbiased); "
                        "0 = exact (default 16)")
    p.add_argument("--proj_seed", type=nonneg_int, default=0, help="seed of the projections, stored with the run (default 0)")
    p.add_argument("--project_linear", action="store_true", help="project linear layers too (default: exact ghost product)")
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
    p.add_argument("--overwrite", action="store_true", help="delete the cached factors (output_dir/factors) and recompute them")
    p.add_argument("--num_shards", type=positive_int, default=1, help="split the training set into N shards (default 1)")
    p.add_argument("--shard_index", type=nonneg_int, default=0, help="which shard this job scores, 0-based (default 0; SLURM_ARRAY_TASK_ID)")
    p.add_argument("--normalize", choices=NORMALIZE, default="train",
                   help="train: divide by the training image's gradient norm per checkpoint (chosen by the README's "
                        "counterfactual table); none: TracIn as in the paper; both: cosine of the two gradients per checkpoint "
                        "(default train; self-influence is never normalised)")
    p.add_argument("--cache_dir", default="", help="factor cache folder (default output_dir/factors; point a second run, "
                   "e.g. with another --normalize, at the first run's cache to score without a forward pass; unsharded runs)")
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
    shas = [file_sha256(p) for p in paths]  # the checkpoint's content is its identity, not its name
    return paths, ckpts, lrs, shas


def check_images(listing, ids: np.ndarray) -> None:
    """Cheap check of every image a run will read, before hours of forward passes.

    Decoding every file would cost minutes on Animals-10; instead each file's header is parsed
    (PIL.Image.open reads a few bytes) and a JPEG must end with its EOI marker, which is what a
    truncated file lacks. A file that passes but still fails to decode stops the run with one line.
    """
    from PIL import Image

    for i in ids:
        path = listing.paths[int(i)]
        try:
            with Image.open(path) as im:
                im.size  # header parsed
                is_jpeg = im.format == "JPEG"
            if is_jpeg:
                with open(path, "rb") as f:
                    f.seek(-2, os.SEEK_END)
                    if f.read(2) != b"\xff\xd9":
                        raise OSError("truncated JPEG (no end-of-image marker)")
        except (OSError, SyntaxError, ValueError) as e:
            raise UserError(f"cannot read image {path}: {str(e).splitlines()[0]}; re-run prepare_data.py "
                            "or remove the file") from None


# ---------------------------------------------------------------- stage 1: factors
class CheckpointFactors:
    """Cached factors of one (split, checkpoint, layer set): A/D per layer and logits over the
    whole split, memory-mapped, with per-row done flags."""

    def __init__(self, root: Path, n: int, dims: dict[str, tuple[int, int]], n_classes: int, meta: dict, cache_root: Path):
        self.root, self.n = root, n
        meta_path = root / "meta.json"
        try:
            saved = json.loads(meta_path.read_text()) if meta_path.exists() else None
        except (OSError, ValueError):
            saved = None  # corrupt: treated as never finished
        if saved is not None and saved != json.loads(json.dumps(meta)):
            raise UserError(f"factor cache {root} belongs to another setting; pass --overwrite to recompute it")
        if saved is None and root.exists():
            # meta.json is written only once every array is allocated: without it (a full disk or a kill while
            # allocating, or a corrupt file) the folder holds no finished rows and starts over.
            remove_inside_owned(root, cache_root, TOOL)
        root.mkdir(parents=True, exist_ok=True)
        shapes = {**{(l, "A"): (n, a) for l, (a, _) in dims.items()}, **{(l, "D"): (n, d) for l, (_, d) in dims.items()}}
        self.arrays = {key: self._open(f"{key[1]}_{key[0]}.npy", shape) for key, shape in shapes.items()}
        self.logits = self._open("logits.npy", (n, n_classes))
        self.done_path = root / "done.npy"
        self.done = load_npy(self.done_path, None, "pass --overwrite to recompute the factor cache") if self.done_path.exists() \
            else np.zeros(n, dtype=bool)
        if self.done.shape != (n,):
            raise UserError(f"factor cache {root} does not match the split; pass --overwrite to recompute it")
        if saved is None:
            save_json(meta_path, meta)
        self._last_sync = time.time()

    @staticmethod
    def new_bytes(root: Path, n: int, dims: dict, n_classes: int) -> int:
        """Disk space a not yet existing cache folder will take."""
        return 0 if (root / "meta.json").exists() else 4 * n * (sum(a + d for a, d in dims.values()) + n_classes) + n

    def _open(self, name, shape):
        path = self.root / name
        fix = "pass --overwrite to recompute the factor cache"
        if path.exists():
            arr = load_npy(path, "r+", fix)
            if arr.shape != shape or arr.dtype != np.float32:
                raise UserError(f"factor cache {path} has the wrong shape; {fix}")
            return arr
        try:
            arr = open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            # Reserve the blocks now: a full disk is then an ENOSPC here, never a SIGBUS mid-run.
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as e:  # name the file (and so the full disk), not the current folder
            raise OSError(e.errno, e.strerror, str(path)) from None
        return arr

    def write(self, rows: np.ndarray, factors: dict, logits: torch.Tensor):
        for layer, (a, d) in factors.items():
            self.arrays[(layer, "A")][rows] = a.float().cpu().numpy()
            self.arrays[(layer, "D")][rows] = d.float().cpu().numpy()
        self.logits[rows] = logits.float().cpu().numpy()
        self.done[rows] = True

    def sync(self, force: bool = True, every_s: float = 10.0):
        """Flush the factors, then the done flags: a flag on disk never claims unwritten rows."""
        if not force and time.time() - self._last_sync < every_s:
            return
        for arr in list(self.arrays.values()) + [self.logits]:
            arr.flush()
        save_npy(self.done_path, self.done)
        self._last_sync = time.time()


def make_hook(model, cfg) -> InfluenceHook:
    return InfluenceHook(model, cfg.layers, proj_dim=cfg.proj_dim, proj_seed=cfg.proj_seed, project_linear=cfg.project_linear)


def factor_setting(cfg, model) -> dict:
    """What the cached factors depend on besides the checkpoint and the images. Projection settings
    count only when some layer is projected, so exact (linear-only) caches keep their key."""
    setting = {"layers": list(cfg.layers), "amp": bool(cfg.amp)}
    if any(make_hook(model, cfg).projected.values()):
        setting.update(proj_dim=cfg.proj_dim, proj_seed=cfg.proj_seed, project_linear=cfg.project_linear)
    return setting


def open_caches(cache_root: Path, split: str, listing, shas, dims, n_classes, cfg, setting: dict) -> list[CheckpointFactors]:
    """One CheckpointFactors per checkpoint; checks free disk space for the new ones first."""
    setting_key = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:8]
    split_dir = cache_root / f"{split}-{listing_key(listing)}"
    roots = [split_dir / f"{sha[:16]}-{setting_key}" for sha in shas]
    n = len(listing.paths)
    need = sum(CheckpointFactors.new_bytes(r, n, dims, n_classes) for r in roots)
    cache_root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache_root).free
    if need > free:
        raise UserError(f"the factor cache needs {need / 2**20:.1f} MiB in {cache_root} but only {free / 2**20:.1f} MiB "
                        "are free; free space or pass another --output_dir")
    meta = lambda sha: {"split": split, "n": n, "checkpoint_sha256": sha, **setting}
    return [CheckpointFactors(r, n, dims, n_classes, meta(sha), cache_root) for r, sha in zip(roots, shas)]


def extract_factors(caches: list[CheckpointFactors], models, cfg, listing, ids: np.ndarray, transform, batch_size,
                    num_workers, device, desc, stop_after=None, amp: bool = False) -> int:
    """Stage 1 for the rows `ids` of one split: computes only rows some checkpoint lacks.

    Rows are batched in the order of `ids`, so the same ids give the same batches (and the same
    bits) in every run. Returns the number of forward batches run now.
    """
    from tqdm import tqdm

    need = ids[~np.all([c.done[ids] for c in caches], axis=0)]
    if len(need) == 0:
        return 0
    dataset = ImageListDataset(listing, transform, need)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    kill_after = int(os.environ.get("TRACIN_KILL_AFTER_BATCHES", "0"))  # fault injection for the resume test
    done_now = 0
    with contextlib.ExitStack() as stack:
        hooks = [stack.enter_context(make_hook(m, cfg)) for m in models]
        for c in caches:
            stack.callback(c.sync)  # persist progress on any exit, Ctrl-C included
        for x, y, idx in tqdm(loader, desc=desc, total=len(loader), disable=None):
            x, y, rows = batch_to_device(x, device), y.to(device, non_blocking=True), idx.numpy()
            for cache, hook in zip(caches, hooks):  # the batch visits every checkpoint before the next is read
                todo = ~cache.done[rows]
                if not todo.any():
                    continue
                with autocast(device) if amp else contextlib.nullcontext():
                    factors, logits, _ = hook.factors(x, y)
                keep = torch.from_numpy(todo).to(device)
                cache.write(rows[todo], {l: (a[keep], d[keep]) for l, (a, d) in factors.items()}, logits[keep])
                cache.sync(force=False)
            done_now += 1
            if kill_after and done_now == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop_after is not None and done_now >= stop_after:
                raise KeyboardInterrupt("stopped on request (test hook)")
    return done_now


class FactorView:
    """The factors of chosen rows (`ids`, split indices) across checkpoints, loaded by row slice."""

    def __init__(self, caches: list[CheckpointFactors], ids: np.ndarray):
        self.caches, self.ids = caches, np.asarray(ids)

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        sel = self.ids[rows]
        return tuple(torch.from_numpy(self.caches[t].arrays[(layer, k)][sel]).to(device) for k in ("A", "D"))

    def nbytes(self) -> int:
        return sum(4 * len(self.ids) * a.shape[1] for c in self.caches for a in c.arrays.values())

    def resident(self, device) -> "ResidentFactors":
        """All chosen factors copied once to `device` (the GPU fast path: no host transfer per block)."""
        return ResidentFactors({(t, l, k): torch.from_numpy(a[self.ids]).to(device)
                                for t, c in enumerate(self.caches) for (l, k), a in c.arrays.items()})

    def logits(self) -> np.ndarray:
        """(n_ckpt, n_rows, C) float32."""
        return np.stack([c.logits[self.ids] for c in self.caches])


class ResidentFactors:
    """Factors held as device tensors, with FactorView's `load` interface."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[(t, layer, "A")][rows], self.tensors[(t, layer, "D")][rows]


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


def logit_figures(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example cross-entropy, logit margin (given-label logit minus the largest other logit;
    Pleiss et al. 2020) and EL2N error norm |softmax - onehot| (Paul et al. 2021) from logits
    (..., n, C) and labels (n,)."""
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).expand(z.shape[:-1])
    given = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    loss = torch.logsumexp(z, -1) - given
    other = z.scatter(-1, y.unsqueeze(-1), -float("inf")).amax(-1)
    el2n = (torch.softmax(z, -1) - torch.nn.functional.one_hot(y, z.shape[-1]).double()).norm(dim=-1)
    return tuple(v.numpy().astype(np.float32) for v in (loss, given - other, el2n))


# ---------------------------------------------------------------- stage 2: scores
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


# ---------------------------------------------------------------- the run
def factor_views(cfg, device, ckpts, shas, train_list, test_list, train_ids, test_ids, cache_root: Path, stop_after=None):
    """Stage 1: the cached factors of the given rows of both splits, computing only rows the cache lacks.
    Returns ({"train": FactorView, "test": FactorView}, forward batches run per split, layer dims)."""
    models = [model_to_device(model_from_checkpoint(c), device) for c in ckpts]  # every checkpoint resident at once
    dims = make_hook(models[0], cfg).dims
    setting = factor_setting(cfg, models[0])
    tf = eval_transform(ckpts[0])
    n_classes = int(ckpts[0]["num_classes"])
    caches, computed, views = {}, {}, {}
    for split, listing, ids in (("train", train_list, train_ids), ("test", test_list, test_ids)):
        caches[split] = open_caches(cache_root, split, listing, shas, dims, n_classes, cfg, setting)
    for split, listing, ids in (("train", train_list, train_ids), ("test", test_list, test_ids)):
        computed[split] = extract_factors(caches[split], models, cfg, listing, ids, tf, cfg.batch_size,
                                          cfg.num_workers, device, f"factors {split}", stop_after,
                                          amp=cfg.amp and device.type == "cuda")
        views[split] = FactorView(caches[split], ids)
    return views, computed, dims


def compute(cfg, device, ckpts, shas, lrs, train_list, test_list, train_ids, test_ids, cache_root: Path, stop_after=None):
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


SHARD_ARRAYS = ("prop_values", "prop_indices", "opp_values", "opp_indices")
SHARD_PARTS = ("self_influence", "train_ids", "loss_last", "pred_last", "loss_per_ckpt", "margin_per_ckpt", "el2n_per_ckpt",
               "grad_sq_norm_per_ckpt")


def merge_shards(out: Path, num_shards: int, identity: dict, device):
    """Exact merge: top-k trackers merge, per-image arrays concatenate in shard order."""
    if num_shards < 2:
        raise UserError("--merge needs --num_shards N (N >= 2), the number of shards that were run")
    dirs = [out / "shards" / f"shard_{i:03d}" for i in range(num_shards)]
    missing = [d.name for d in dirs if not (d / "complete.json").exists()]
    if missing:
        raise UserError(f"shard(s) {', '.join(missing)} in {out / 'shards'} are not finished; run them before --merge")
    fix = "rerun that shard"
    complete = {d.name: read_json(d / "complete.json", fix) for d in dirs}
    stale = [d.name for d in dirs if complete[d.name].get("identity") != json.loads(json.dumps(identity))]
    if stale:
        raise UserError(f"shard(s) {', '.join(stale)} in {out / 'shards'} were run with other arguments; rerun them with these")
    tracker, parts = None, {k: [] for k in SHARD_PARTS}
    for d in dirs:
        state = {k: torch.from_numpy(np.array(load_npy(d / f"{k}.npy", None, fix))) for k in SHARD_ARRAYS}
        t = TopKInfluenceTracker.from_state(state, device=device)
        tracker = t if tracker is None else tracker.merge(t)
        for k in parts:
            if (d / f"{k}.npy").exists():
                parts[k].append(load_npy(d / f"{k}.npy", None, fix))
    axis = {k: 1 for k in SHARD_PARTS if k.endswith("_per_ckpt")}
    merged = {k: (np.concatenate(v, axis=axis.get(k, 0)) if v else None) for k, v in parts.items()}
    merged["tracker"] = tracker
    seconds = sum(float(complete[d.name].get("seconds", 0.0)) for d in dirs)
    return merged, load_npy(dirs[0] / "test_pred.npy", None, fix), seconds


def run(cfg: TracInConfig, _stop_after_batches: int | None = None) -> dict:
    """One unsharded run, one shard (--num_shards > 1), or the merge of finished shards (--merge)."""
    t_start = time.time()
    device = resolve_device(cfg.device)
    if cfg.cache_dir and is_relative_to(Path(cfg.output_dir), Path(cfg.cache_dir)):  # --overwrite clears the cache
        raise UserError(f"--cache_dir {cfg.cache_dir} is (or holds) the --output_dir {cfg.output_dir}; a folder is a cache or an "
                        "output, not both: pass a cache folder of its own (default output_dir/factors)")
    out = ensure_output_dir(cfg.output_dir, "--output_dir")
    train_list, test_list = list_split(cfg.data_dir, "train"), list_split(cfg.data_dir, "test")
    if train_list.class_names != test_list.class_names:
        raise UserError(f"train and test class folders differ in {cfg.data_dir}")
    paths, ckpts, lrs, shas = load_checkpoints(cfg, train_list.class_names)
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
    model0 = model_from_checkpoint(ckpts[0])
    try:  # blocks expand to their layers
        cfg.layers = target_layers(model0, cfg.layers)
    except ValueError as e:
        raise UserError(f"--layers: {e}") from None
    try:  # each layer's projection checked against its width
        make_hook(model0, cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    # What the scores depend on (the factors' own identity is their cache key).
    data_id = data_identity(cfg.data_dir)
    identity = {**data_id, "checkpoint_sha256": shas, "lr_weights": lrs,
                "layers": cfg.layers, "top_k": cfg.top_k, "batch_size": cfg.batch_size, "train_subset": cfg.train_subset,
                "test_subset": cfg.test_subset, "seed": cfg.seed, "self_influence": cfg.self_influence,
                "num_shards": cfg.num_shards, "amp": cfg.amp, "normalize": cfg.normalize, "train_block": cfg.train_block, "test_block": cfg.test_block,
                "factors": factor_setting(cfg, model0)}
    if cfg.merge or cfg.num_shards == 1:  # a folder or symlink where a results file goes: refused before any work
        check_writable_names(out, [f"{a}.npy" for a in ARRAYS] + list(TABLES) + [RECORD])
    work_dir = out / "shards" / f"shard_{cfg.shard_index:03d}" if cfg.num_shards > 1 else out
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else work_dir / "factors"
    if not cfg.merge:
        check_images(train_list, train_ids)
        check_images(test_list, test_ids)
        if cfg.overwrite:
            remove_owned(cache_root, TOOL)  # only a cache this script marked as its own

    if cfg.merge:
        parts, test_pred, timings = merge_shards(out, cfg.num_shards, identity, device)
        tracker = parts.pop("tracker")
        summary_extra = {"seconds_factors": timings, "batches_computed": "merged"}
    else:
        units = np.array_split(np.arange(n_units), cfg.num_shards)[cfg.shard_index]
        shard_ids = train_ids[units[0] * unit: (units[-1] + 1) * unit] if cfg.num_shards > 1 else train_ids
        if cache_root.exists() and any(cache_root.iterdir()) and not owned_by(cache_root, TOOL):
            raise UserError(f"{cache_root} was not written by {TOOL} (no {OWNER_MARKER} marker); pass another --output_dir")
        mark_owned(cache_root, TOOL)
        if cfg.num_shards > 1:
            mark_owned(work_dir, TOOL)
            (work_dir / "complete.json").unlink(missing_ok=True)
        tracker, parts, test_pred, summary_extra = compute(cfg, device, ckpts, shas, lrs, train_list, test_list, shard_ids,
                                                           test_ids, cache_root, _stop_after_batches)
        if cfg.num_shards > 1:
            for name in SHARD_ARRAYS:
                save_npy(work_dir / f"{name}.npy", tracker.state()[name].numpy())
            for name in SHARD_PARTS:
                if parts.get(name) is not None:
                    save_npy(work_dir / f"{name}.npy", parts[name])
            save_npy(work_dir / "test_pred.npy", test_pred)
            save_json(work_dir / "complete.json", {"shard_index": cfg.shard_index, "n_train": len(shard_ids),
                                                   "seconds": time.time() - t_start, "identity": identity})
            log.info(f"TracIn shard {cfg.shard_index + 1}/{cfg.num_shards}: {len(shard_ids)} train x {len(test_ids)} test "
                     f"in {time.time() - t_start:.1f}s; run with --merge once every shard is done")
            return {"shard_index": cfg.shard_index, "n_train": len(shard_ids), **summary_extra}

    return write_outputs(cfg, out, identity, tracker, parts, test_pred, train_list, test_list, train_ids, test_ids,
                         paths, ckpts, shas, lrs, device, t_start, summary_extra)


def write_outputs(cfg, out, identity, tracker, parts, test_pred, train_list, test_list, train_ids, test_ids, paths, ckpts,
                  shas, lrs, device, t_start, extra) -> dict:
    prop_v, prop_i = (x.cpu().numpy() for x in tracker.proponents())
    opp_v, opp_i = (x.cpu().numpy() for x in tracker.opponents())
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
    table = pd.concat(frames).sort_values(["test_idx", "kind", "rank"], ascending=[True, False, True])

    pairs = len(train_ids) * len(test_ids)
    neg_share = float((opp_v < 0).mean())
    summary = {
        "pairs_scored": pairs, "n_train": len(train_ids), "n_test": len(test_ids), "n_checkpoints": len(ckpts),
        "seconds_total": time.time() - t_start, "opponent_negative_share": neg_share,
        "proponent_negative_share": float((prop_v < 0).mean()), **extra,
    }
    arrays = {
        "top_k_influences_values": prop_v.astype(np.float32), "top_k_influences_indices": prop_i.astype(np.int64),
        "top_k_opponents_values": opp_v.astype(np.float32), "top_k_opponents_indices": opp_i.astype(np.int64),
        "test_indices": np.asarray(test_ids, dtype=np.int64), "train_indices": np.asarray(train_ids, dtype=np.int64),
        "test_pred": np.asarray(test_pred, dtype=np.int64),
        # indexed like train_indices.npy (the full split when no --train_subset)
        "self_influence": parts.get("self_influence"),
        "train_loss_last": parts["loss_last"], "train_pred_last": parts["pred_last"],
        "train_loss_per_ckpt": parts["loss_per_ckpt"], "train_margin_per_ckpt": parts["margin_per_ckpt"],
        "train_el2n_per_ckpt": parts["el2n_per_ckpt"], "train_grad_sq_norm_per_ckpt": parts.get("grad_sq_norm_per_ckpt"),
    }
    record = {
        "args": asdict(cfg), "identity": identity, "git_commit": git_commit(), "device": str(device),
        "data": {**{k: identity[k] for k in ("data_dir", "manifest_key", "train_key", "test_key")}, "n_train_split": len(train_list.paths),
                 "n_test_split": len(test_list.paths), "class_names": list(train_list.class_names)},
        "checkpoints": [{"path": str(p), "sha256": sha, "epoch": c["epoch"], "lr": lr, "train_run": c.get("train_run")}
                        for p, c, sha, lr in zip(paths, ckpts, shas, lrs)],
        "layers": cfg.layers, "summary": summary,
    }
    try:  # a corrupt or foreign record is simply replaced
        old = json.loads((out / "run.json").read_text())["args"]["normalize"]
    except (OSError, ValueError, KeyError, TypeError):
        old = cfg.normalize
    if old != cfg.normalize:
        log.warning(f"warning: replacing results of --normalize {old} in {out} with --normalize {cfg.normalize} "
                    "(use another --output_dir to keep both)")
    write_run(out, arrays, {"top_k_influences.csv": table}, record)
    log.info(f"TracIn: {pairs:,} pairs scored ({len(test_ids)} test x {len(train_ids)} train, {len(ckpts)} checkpoints, "
             f"layers {','.join(cfg.layers)}) in {summary['seconds_total']:.1f}s "
             f"(forward batches run: {extra['batches_computed']}); negative share among opponents {neg_share:.1%}; outputs in {out}")
    return summary


def main(argv=None):
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    cli(main)
