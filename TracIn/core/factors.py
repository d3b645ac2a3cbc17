"""Stage 1 of TracIn: per-example factors (a, d) of the target layers and the logits, cached on disk.

    from TracIn.core.factors import factor_views
    views, computed, dims = factor_views(factor_args, device, ckpts, shas, train_list, test_list, train_ids, test_ids,
                                         cache_root, num_workers)
    a, d = views["train"].load(t, "fc", slice(0, 100), device)     # checkpoint t, layer fc, rows 0..99

The cache is output_dir/factors/<split>-<image list key>/<checkpoint sha256>-<layers key>/: memory-mapped .npy over
the whole split with per-row done flags, so any subset reuses rows already computed, a new checkpoint costs only its
own forward passes, and a retrained checkpoint or re-prepared data can never reuse a stale cache. A killed run resumes
where it stopped and gives the same bits. Every factor source has the same `load(t, layer, rows, device) -> (A, D)`
interface: FactorView (from the cache), ResidentFactors (held on the GPU), methods.NormalizedView (unit gradients).

Why one module over 300 lines: stage 1 is one mechanism, the cache's layout and keys, the resumable writer that fills
it and the views that read it; apart, the writer and its readers could disagree on a key or a row.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from lib.checkpoints import find_checkpoints, load_checkpoint, model_from_checkpoint
from lib.cli import UserError, first_line
from lib.data_utils import ImageListDataset, eval_transform, listing_key
from lib.devices import autocast, batch_to_device, model_to_device
from lib.files import file_sha256, load_npy, save_json, save_npy
from lib.ownership import claim_allocated, remove_inside_owned
from TracIn.core.arguments import FactorArguments
from TracIn.influence_utils import InfluenceHook

TOOL = "efficient_tracin"  # the owner of every factor cache folder


def choose_subset(n: int, size: int, seed: int) -> np.ndarray:
    """A sorted seeded random subset of range(n) of `size` (0: all of it)."""
    if size == 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def load_checkpoints(cfg, class_names: list[str]):
    """The run's checkpoints (cfg.checkpoints, or every finetune_epoch_*.pth of cfg.checkpoint_dir, or of each
    cfg.members folder in turn), checked to be one model family; returns (paths, checkpoint dicts, lr_t per checkpoint,
    sha256 per file, members: the checkpoint indices of each training run)."""
    members = list(getattr(cfg, "members", None) or [])
    if members:
        per_member = []
        for folder in members:
            found = find_checkpoints(folder)
            if not found:
                raise UserError(f"--members {folder}: no finetune_epoch_*.pth there (train the member first)")
            per_member.append(found)
        paths = [p for found in per_member for p in found]
        sizes = [len(found) for found in per_member]
    else:
        paths = [Path(p) for p in cfg.checkpoints] or find_checkpoints(cfg.checkpoint_dir)
        sizes = list(getattr(cfg, "member_sizes", None) or []) or [len(paths)]
    if not paths:
        raise UserError(f"no checkpoints: no finetune_epoch_*.pth in {cfg.checkpoint_dir} (train first or pass --checkpoints)")
    if sum(sizes) != len(paths) or min(sizes) < 1:
        raise UserError(f"member sizes {sizes} do not match the {len(paths)} checkpoints; rerun efficient_tracin.py")
    ckpts = [load_checkpoint(p, class_names=class_names) for p in paths]
    first = ckpts[0]
    for p, c in zip(paths, ckpts):
        if (c["arch"], c["image_size"], c["mean"], c["std"]) != (first["arch"], first["image_size"], first["mean"], first["std"]):
            raise UserError(f"{p} differs from {paths[0]} in arch, image size or normalisation; TracIn needs one model family")
    if cfg.lr_weights and len(cfg.lr_weights) != len(paths):
        raise UserError(f"--lr_weights has {len(cfg.lr_weights)} values for {len(paths)} checkpoints")
    lrs = list(cfg.lr_weights) or [float(c["lr"]) for c in ckpts]
    shas = [file_sha256(p) for p in paths]  # the checkpoint's content is its identity, not its name
    bounds = np.cumsum([0] + sizes)
    groups = [list(range(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]
    if members:
        check_members(members, [[ckpts[t] for t in g] for g in groups])
    return paths, ckpts, lrs, shas, groups


def check_members(folders: list[str], ckpts: list[list[dict]]) -> None:
    """Members of one ensemble: one class set and model family (load_checkpoints checks), each its own training run,
    all trained on the same training split (train_args.json's data_train_key, where train.py wrote one)."""
    from lib.files import read_json

    runs = [c[-1].get("train_run") for c in ckpts]
    seen = {}
    for folder, run in zip(folders, runs):
        if run and run in seen:
            raise UserError(f"--members {folder} and {seen[run]} hold the same training run ({run}); each member is its own run")
        seen[run] = folder
    keys = {}
    for folder in folders:
        args = Path(folder) / "train_args.json"
        if args.exists():
            keys[folder] = read_json(args, "retrain that member").get("data_train_key")
    if len(set(keys.values())) > 1:
        first = next(iter(keys))
        other = next(f for f in keys if keys[f] != keys[first])
        raise UserError(f"--members {other} was trained on another training split than {first} (data_train_key "
                        f"{keys[other]} vs {keys[first]}); an ensemble's members share the data")


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
            raise UserError(f"cannot read image {path}: {first_line(e)}; re-run prepare_data.py "
                            "or remove the file") from None



# ---------------------------------------------------------------- the cache
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
        self.fresh = saved is None  # an unfinished folder: its arrays (kept only if changed since recorded) are written anew
        root.mkdir(parents=True, exist_ok=True)
        shapes = {**{(l, "A"): (n, a) for l, (a, _) in dims.items()}, **{(l, "D"): (n, d) for l, (_, d) in dims.items()}}
        self.arrays = {key: self._open(f"{key[1]}_{key[0]}.npy", shape) for key, shape in shapes.items()}
        self.logits = self._open("logits.npy", (n, n_classes))
        claim_allocated([self.root / f"{k[1]}_{k[0]}.npy" for k in shapes] + [self.root / "logits.npy"])  # filled in place
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
        if path.exists() and not self.fresh:
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


def make_hook(model, factor_args: FactorArguments) -> InfluenceHook:
    return InfluenceHook(model, factor_args.layers, proj_dim=factor_args.proj_dim, proj_seed=factor_args.proj_seed,
                         project_linear=factor_args.project_linear)


def factor_setting(factor_args: FactorArguments, model) -> dict:
    """The factor cache's key for this model: FactorArguments.key, with projection settings when a layer is projected."""
    return factor_args.key(projected=any(make_hook(model, factor_args).projected.values()))


def open_caches(cache_root: Path, split: str, listing, shas, dims, n_classes, setting: dict) -> list[CheckpointFactors]:
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


def extract_factors(caches: list[CheckpointFactors], models, factor_args: FactorArguments, listing, ids: np.ndarray, transform,
                    num_workers, device, desc) -> int:
    """Stage 1 for the rows `ids` of one split: computes only rows some checkpoint lacks.

    Rows are batched in the order of `ids`, so the same ids give the same batches (and the same
    bits) in every run. Returns the number of forward batches run now.
    """
    from tqdm import tqdm

    need = ids[~np.all([c.done[ids] for c in caches], axis=0)]
    if len(need) == 0:
        return 0
    dataset = ImageListDataset(listing, transform, need)
    amp = factor_args.amp and device.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=factor_args.batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    done_now = 0
    with contextlib.ExitStack() as stack:
        hooks = [stack.enter_context(make_hook(m, factor_args)) for m in models]
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


def curvature_store(view: FactorView) -> Path:
    """Where a curvature computed from this training view is kept: beside the last checkpoint's factors (removed with
    them), named by every checkpoint cache it reads and the rows it uses."""
    h = hashlib.sha256()
    for c in view.caches:
        h.update(c.root.name.encode() + b"\0")
    h.update(np.ascontiguousarray(view.ids, dtype=np.int64).tobytes())
    return view.caches[-1].root / f"curvature-{h.hexdigest()[:16]}"


class ResidentFactors:
    """Factors held as device tensors, with FactorView's `load` interface."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def load(self, t: int, layer: str, rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[(t, layer, "A")][rows], self.tensors[(t, layer, "D")][rows]



def factor_views(factor_args: FactorArguments, device, ckpts, shas, train_list, test_list, train_ids, test_ids, cache_root: Path,
                 num_workers: int):
    """Stage 1: the cached factors of the given rows of both splits, computing only rows the cache lacks.
    Returns ({"train": FactorView, "test": FactorView}, forward batches run per split, layer dims)."""
    models = [model_to_device(model_from_checkpoint(c), device) for c in ckpts]  # every checkpoint resident at once
    dims = make_hook(models[0], factor_args).dims
    setting = factor_setting(factor_args, models[0])
    tf = eval_transform(ckpts[0])
    n_classes = int(ckpts[0]["num_classes"])
    caches, computed, views = {}, {}, {}
    for split, listing, ids in (("train", train_list, train_ids), ("test", test_list, test_ids)):
        caches[split] = open_caches(cache_root, split, listing, shas, dims, n_classes, setting)
    for split, listing, ids in (("train", train_list, train_ids), ("test", test_list, test_ids)):
        computed[split] = extract_factors(caches[split], models, factor_args, listing, ids, tf, num_workers, device,
                                          f"factors {split}")
        views[split] = FactorView(caches[split], ids)
    return views, computed, dims


