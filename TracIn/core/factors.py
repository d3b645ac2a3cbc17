"""Stage 1 of TracIn: per-example factors (a, d) of the target layers and the logits, cached on disk.

    from TracIn.core.factors import factor_views
    views, computed = factor_views(factor_args, models, dims, setting, device, ckpts, shas, train_list, test_list,
                                   train_ids, test_ids, cache_root, num_workers)   # run.InfluenceRun.score calls it
    a, d = views["train"].load(t, "fc", slice(0, 100), device)     # checkpoint t, layer fc, rows 0..99
    views["train"].sha256()                                         # the digest of the cached rows it reads

The cache is output_dir/factors/<split>-<image list key>/<checkpoint sha256>-<layers key>/: memory-mapped .npy over
the whole split with per-row done flags, so any subset reuses rows already computed, a new checkpoint costs only its
own forward passes, and a retrained checkpoint or re-prepared data can never reuse a stale cache. A killed run resumes
where it stopped and gives the same bits. The cache proves its content: each row carries a checksum written with it and
checked when the cache is opened, each file the size its header implies, and a cache that fails is computed again
(CheckpointFactors); `FactorView.sha256` is the digest of the rows a run read, which run.json records and
InfluenceRun.factors checks on reuse. Every factor source has the same `load(t, layer, rows, device) -> (A, D)`
interface: FactorView (from the cache), ResidentFactors (held on the GPU), methods.NormalizedView (unit gradients).

Why one module over 300 lines: stage 1 is one mechanism, the cache's layout and keys, the resumable writer that fills
it and the views that read it; apart, the writer and its readers could disagree on a key or a row.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from lib.checkpoints import CHECKPOINT_RE, SELECTED, find_checkpoints, load_checkpoint, weights_sha256
from lib.cli import UserError, first_line
from lib.data_utils import ImageListDataset, check_same_split, eval_transform, listing_key
from lib.devices import autocast, batch_to_device
from lib.files import file_sha256, load_npy, npy_damage, read_json, save_json, save_npy
from lib.ownership import Owner
from lib.timing import Phases
from TracIn.core.arguments import FactorArguments
from TracIn.core.ghost import InfluenceHook

OWNER = Owner("efficient_tracin")  # efficient_tracin.py: the owner of every factor cache folder and run it writes
log = logging.getLogger(__name__)


def choose_subset(n: int, size: int, seed: int) -> np.ndarray:
    """A sorted seeded random subset of range(n) of `size` (0: all of it)."""
    if size == 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def selected_trajectory(folder, all_checkpoints: bool) -> tuple[list[Path], str]:
    """The checkpoints of the training run in `folder` that TracIn sums over, and how they were chosen: by default the
    run's checkpoints up to the model train.py selected (its selected_model.json), with that model last (the
    checkpoint of its epoch, else the best-model file, which is a checkpoint of the run at that epoch); with
    all_checkpoints, or for a run that records no selection, every checkpoint."""
    found = find_checkpoints(folder)
    record_path = Path(folder) / SELECTED
    if all_checkpoints or not record_path.exists():
        why = "every checkpoint (--all_checkpoints)" if all_checkpoints else \
            f"every checkpoint ({folder} records no selected model: trained by an older train.py)"
        return found, why
    fix = f"retrain, or pass --all_checkpoints to explain every checkpoint of {folder}"
    sel = read_json(record_path, fix)
    epoch, path, sha, weights = (sel.get(k) for k in ("epoch", "path", "sha256", "weights_sha256"))
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1 or \
            not all(isinstance(v, str) and v for v in (path, sha, weights)):
        raise UserError(f"{record_path} is not train.py's record of a selected model (epoch, path, sha256, "
                        f"weights_sha256); {fix}")
    path = Path(path)
    by_epoch = {int(CHECKPOINT_RE.search(p.name).group(1)): p for p in found}
    before = [by_epoch[e] for e in sorted(by_epoch) if e < epoch]
    if epoch in by_epoch:  # the run's own checkpoint of that epoch: the same weights as the best-model file
        last = by_epoch[epoch]
        if weights_sha256(load_checkpoint(last)) != weights:
            raise UserError(f"{last} is not the model train.py selected at epoch {epoch} (other weights than "
                            f"{record_path} records); {fix}")
    else:
        if not path.is_file() or file_sha256(path) != sha:
            raise UserError(f"the model train.py selected ({path}, epoch {epoch}) is missing or changed since training; {fix}")
        last = path
    return before + [last], f"the model train.py selected on {sel.get('selected_on', 'val')} (epoch {epoch}) and the checkpoints before it"


def load_checkpoints(cfg, class_names: list[str]):
    """The run's checkpoints, checked once for every tool: cfg.checkpoints, or the trajectory of cfg.checkpoint_dir (or
    of each cfg.members folder in turn) up to its selected model (selected_trajectory). Each run's checkpoints are
    ordered by their recorded epoch, must come from one training run, be trained on this data's split, and share one
    model family. Returns (paths, checkpoint dicts, lr_t per checkpoint, sha256 per file, members: the checkpoint
    indices of each training run, how the checkpoints were chosen)."""
    members = list(getattr(cfg, "members", None) or [])
    everything = bool(getattr(cfg, "all_checkpoints", False))
    if members:
        per_member, reasons = [], []
        for folder in members:
            found, why = selected_trajectory(folder, everything)
            if not found:
                raise UserError(f"--members {folder}: no finetune_epoch_*.pth there (train the member first)")
            per_member.append(found)
            reasons.append(f"member {len(reasons)}: {why}")
        chosen = "; ".join(reasons)
        paths = [p for found in per_member for p in found]
        sizes = [len(found) for found in per_member]
    elif cfg.checkpoints:
        paths, chosen = [Path(p) for p in cfg.checkpoints], "the --checkpoints given"
        sizes = list(getattr(cfg, "member_sizes", None) or []) or [len(paths)]
    else:
        paths, chosen = selected_trajectory(cfg.checkpoint_dir, everything)
        sizes = [len(paths)]
    if not paths:
        raise UserError(f"no checkpoints: no finetune_epoch_*.pth in {cfg.checkpoint_dir} (train first or pass --checkpoints)")
    if sum(sizes) != len(paths) or min(sizes) < 1:
        raise UserError(f"member sizes {sizes} do not match the {len(paths)} checkpoints; rerun efficient_tracin.py")
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise UserError("a checkpoint is given twice; each checkpoint of the trajectory once")
    if cfg.lr_weights and len(cfg.lr_weights) != len(paths):
        raise UserError(f"--lr_weights has {len(cfg.lr_weights)} values for {len(paths)} checkpoints")
    ckpts = [load_checkpoint(p, class_names=class_names) for p in paths]
    first = ckpts[0]
    for p, c in zip(paths, ckpts):
        if (c["arch"], c["image_size"], c["mean"], c["std"]) != (first["arch"], first["image_size"], first["mean"], first["std"]):
            raise UserError(f"{p} differs from {paths[0]} in arch, image size or normalisation; TracIn needs one model family")
        check_same_split(c, cfg.data_dir, p)
    lrs = list(cfg.lr_weights) or [float(c["lr"]) for c in ckpts]
    bounds = np.cumsum([0] + sizes)
    groups = [list(range(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]
    order = []  # each run's checkpoints by recorded epoch, whatever order they were given in
    for g in groups:
        check_one_run([paths[t] for t in g], [ckpts[t] for t in g])
        order += sorted(g, key=lambda t: int(ckpts[t]["epoch"]))
    paths, ckpts, lrs = [paths[t] for t in order], [ckpts[t] for t in order], [lrs[t] for t in order]
    shas = [file_sha256(p) for p in paths]  # the checkpoint's content is its identity, not its name
    if members:
        check_members(members, [[ckpts[t] for t in g] for g in groups])
    return paths, ckpts, lrs, shas, groups, chosen


def check_one_run(paths: list[Path], ckpts: list[dict]) -> None:
    """The checkpoints TracIn sums over are one training run's trajectory: one train_run, each epoch once."""
    runs = {c.get("train_run") for c in ckpts}
    if len(runs) > 1:
        a = next(p for p, c in zip(paths, ckpts) if c.get("train_run") == ckpts[0].get("train_run"))
        b = next(p for p, c in zip(paths, ckpts) if c.get("train_run") != ckpts[0].get("train_run"))
        raise UserError(f"{a} and {b} come from different training runs; TracIn sums over one run's checkpoints "
                        "(an ensemble of runs: --members)")
    epochs = [int(c["epoch"]) for c in ckpts]
    if len(set(epochs)) != len(epochs):
        twice = next(e for e in epochs if epochs.count(e) > 1)
        raise UserError(f"two checkpoints of epoch {twice} ({', '.join(str(p) for p, e in zip(paths, epochs) if e == twice)}); "
                        "give each epoch of the run once")


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
    from lib.training import SAME_SETTINGS

    keys, settings = {}, {}
    for folder in folders:
        args = Path(folder) / "train_args.json"
        if args.exists():
            saved = read_json(args, "retrain that member")
            keys[folder] = saved.get("data_train_key")
            settings[folder] = {k: saved.get(k) for k in SAME_SETTINGS}
    if settings:
        first = next(iter(settings))
        for folder, s in settings.items():
            differ = [f"--{k} {s[k]} (member {first}: {settings[first][k]})" for k in SAME_SETTINGS if s[k] != settings[first][k]]
            if differ:
                raise UserError(f"--members {folder} was trained with other settings than {first}: {', '.join(differ)}; an "
                                "ensemble's members are runs of the same settings")
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
def row_sums(block: np.ndarray) -> np.ndarray:
    """(rows, w) array -> (rows,) uint64: the first 8 bytes of each row's sha256, the cache's per-row checksum."""
    block = np.ascontiguousarray(block)
    if block.size == 0:
        return np.zeros(len(block), dtype=np.uint64)
    raw, step = memoryview(block).cast("B"), block.itemsize * int(np.prod(block.shape[1:], dtype=np.int64))
    return np.frombuffer(b"".join(hashlib.sha256(raw[i * step:(i + 1) * step]).digest()[:8] for i in range(len(block))),
                         dtype="<u8").copy()


class CheckpointFactors:
    """Cached factors of one (split, checkpoint, layer set): A/D per layer and logits over the whole split, memory-mapped,
    with per-row done flags (done.npy) and per-row checksums (checksums.npy: (n, files) uint64, the first 8 bytes of the
    sha256 of each file's row, computed from the bytes written).

    Opening proves the content: each file's size must be what its header says (checked before the memory map, which
    would zero-extend a file cut short) and every row the flags claim must match its checksum (one read of the claimed
    rows); a cache that fails starts over, said in a warning, so its rows are computed again rather than read as zeros.
    Checksums are per row, not per file, because runs of other subsets add rows to a shared cache: `sha256(ids)`, a
    digest of the rows a run reads, stays the same when other rows are added, and run.json records it."""

    def __init__(self, root: Path, n: int, dims: dict[str, tuple[int, int]], n_classes: int, meta: dict, cache_root: Path):
        self.root, self.n, self.cache_root = root, n, cache_root
        meta_path = root / "meta.json"
        try:
            saved = json.loads(meta_path.read_text()) if meta_path.exists() else None
        except (OSError, ValueError):
            saved = None  # corrupt: treated as never finished
        if saved is not None and saved != json.loads(json.dumps(meta)):
            raise UserError(f"factor cache {root} belongs to another setting; pass --overwrite to recompute it")
        self.shapes = {**{(l, k): (n, dims[l][0] if k == "A" else dims[l][1]) for l in dims for k in ("A", "D")},
                       "logits": (n, n_classes)}
        self.names = [f"{k[1]}_{k[0]}.npy" if isinstance(k, tuple) else f"{k}.npy" for k in self.shapes]
        self.done_path, self.sums_path = root / "done.npy", root / "checksums.npy"
        self.fresh = False
        # meta.json is written only once every array is allocated: without it (a full disk or a kill while allocating,
        # or a corrupt file) the folder holds no finished rows and starts over.
        damage = "no meta.json" if saved is None else self._open()
        if damage is not None and root.exists():
            if saved is not None:
                log.warning(f"warning: factor cache {damage}; its rows are computed again")
            self.arrays = self.logits = None  # unmap before removing
            OWNER.folder(cache_root, "--cache_dir").remove(root)
        if damage is not None:
            root.mkdir(parents=True, exist_ok=True)
            self.fresh = True  # arrays the removal kept (changed since recorded) are written anew
            if self._open() is not None:  # a fresh folder holds nothing to doubt
                raise UserError(f"factor cache {root} cannot be created; pass another --output_dir")
            save_json(meta_path, meta)
        self._last_sync = time.time()

    def _open(self) -> str | None:
        """Map the files (allocating absent ones) and read the flags and checksums; returns what is wrong with a
        cache whose claimed rows cannot be trusted, or None."""
        self.root.mkdir(parents=True, exist_ok=True)
        for name, shape in zip(self.names, self.shapes.values()):
            path = self.root / name
            damage = npy_damage(path) if path.exists() and not self.fresh else None
            if damage is not None:
                return damage
        arrays = [self._map(name, shape) for name, shape in zip(self.names, self.shapes.values())]
        OWNER.claim(self.cache_root, [(self.root / name).relative_to(self.cache_root).as_posix() for name in self.names],
                    allocated=True)  # filled in place: recorded by size until sealed
        self.arrays = dict(zip(list(self.shapes)[:-1], arrays[:-1]))
        self.logits = arrays[-1]
        if not self.done_path.exists():
            self.done, self.sums = np.zeros(self.n, dtype=bool), np.zeros((self.n, len(self.names)), dtype=np.uint64)
            return None
        damage = npy_damage(self.done_path)
        if damage is not None:
            return damage
        self.done = np.load(self.done_path, allow_pickle=False)
        if self.done.shape != (self.n,) or self.done.dtype != bool:
            return f"{self.done_path} does not match the split"
        if not self.done.any():
            self.sums = np.zeros((self.n, len(self.names)), dtype=np.uint64)
            return None
        if npy_damage(self.sums_path) is not None:
            return f"{self.root} has no readable checksums.npy for its finished rows"
        self.sums = np.load(self.sums_path, allow_pickle=False)
        if self.sums.shape != (self.n, len(self.names)) or self.sums.dtype != np.uint64:
            return f"{self.sums_path} does not match the cache's files"
        rows = np.flatnonzero(self.done)
        for j, (name, arr) in enumerate(zip(self.names, arrays)):
            for r0 in range(0, len(rows), 4096):  # bounded memory: 4096 rows at a time
                sel = rows[r0:r0 + 4096]
                bad = row_sums(arr[sel]) != self.sums[sel, j]
                if bad.any():
                    return (f"{self.root / name} row {int(sel[bad][0])} differs from its checksum "
                            f"({int(bad.sum())} of these {len(sel)} rows do)")
        return None

    @staticmethod
    def new_bytes(root: Path, n: int, dims: dict, n_classes: int) -> int:
        """Disk space a not yet existing cache folder will take."""
        return 0 if (root / "meta.json").exists() else (4 * (sum(a + d for a, d in dims.values()) + n_classes) + 1
                                                        + 8 * (2 * len(dims) + 1)) * n

    def _map(self, name, shape):
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
        values = {**{(l, k): x for l, (a, d) in factors.items() for k, x in (("A", a), ("D", d))}, "logits": logits}
        for j, key in enumerate(self.shapes):
            block = values[key].float().cpu().numpy()
            (self.logits if key == "logits" else self.arrays[key])[rows] = block
            self.sums[rows, j] = row_sums(block)
        self.done[rows] = True

    def sync(self, force: bool = True, every_s: float = 10.0):
        """Flush the factors, then their checksums, then the done flags: a flag on disk never claims unwritten rows."""
        if not force and time.time() - self._last_sync < every_s:
            return
        for arr in list(self.arrays.values()) + [self.logits]:
            arr.flush()
        save_npy(self.sums_path, self.sums)
        save_npy(self.done_path, self.done)
        self._last_sync = time.time()

    def sha256(self, ids: np.ndarray) -> str:
        """A digest of the rows `ids` as cached (their checksums, file by file): what a run read from this cache."""
        h = hashlib.sha256(json.dumps(self.names).encode())
        h.update(np.ascontiguousarray(self.sums[np.asarray(ids)]).tobytes())
        return h.hexdigest()


def make_hook(model, factor_args: FactorArguments) -> InfluenceHook:
    return InfluenceHook(model, factor_args.layers, proj_dim=factor_args.proj_dim, proj_seed=factor_args.proj_seed,
                         project_linear=factor_args.project_linear)


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
                    num_workers, device, desc, phases: Phases | None = None) -> int:
    """Stage 1 for the rows `ids` of one split: computes only rows some checkpoint lacks.

    Rows are batched in the order of `ids`, so the same ids give the same batches (and the same
    bits) in every run. Returns the number of forward batches run now; phases gets the seconds of the forward +
    backward passes (seconds_forward_backward) and of the cache writes and flushes (seconds_cache_writes).
    """
    from tqdm import tqdm

    need = ids[~np.all([c.done[ids] for c in caches], axis=0)]
    if len(need) == 0:
        return 0
    phases = Phases() if phases is None else phases

    def flush(cache):  # persist progress on any exit, Ctrl-C included
        with phases("seconds_cache_writes"):
            cache.sync()

    dataset = ImageListDataset(listing, transform, need)
    amp = factor_args.amp and device.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=factor_args.batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    done_now = 0
    with contextlib.ExitStack() as stack:
        hooks = [stack.enter_context(make_hook(m, factor_args)) for m in models]
        for c in caches:
            stack.callback(flush, c)
        for x, y, idx in tqdm(loader, desc=desc, total=len(loader), disable=None):
            x, y, rows = batch_to_device(x, device), y.to(device, non_blocking=True), idx.numpy()
            for cache, hook in zip(caches, hooks):  # the batch visits every checkpoint before the next is read
                todo = ~cache.done[rows]
                if not todo.any():
                    continue
                with phases("seconds_forward_backward"), autocast(device) if amp else contextlib.nullcontext():
                    factors, logits, _ = hook.factors(x, y)
                keep = torch.from_numpy(todo).to(device)
                with phases("seconds_cache_writes"):
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

    def sha256(self) -> str:
        """A digest of the factors this view reads (each cache's checksums of the rows `ids`): run.json records it."""
        return hashlib.sha256("".join(c.sha256(self.ids) for c in self.caches).encode()).hexdigest()

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



def factor_views(factor_args: FactorArguments, models, dims: dict, setting: dict, device, ckpts, shas, train_list, test_list,
                 train_ids, test_ids, cache_root: Path, num_workers: int, phases: Phases | None = None):
    """Stage 1: the cached factors of the given rows of both splits, computing only rows the cache lacks. models: every
    checkpoint's model on `device` (all resident at once); dims: the hook's (A, D) widths per layer; setting: the
    factor key (FactorArguments.key). Returns ({"train": FactorView, "test": FactorView}, forward batches run per split)."""
    tf = eval_transform(ckpts[0])
    n_classes = int(ckpts[0]["num_classes"])
    caches, computed, views = {}, {}, {}
    for split, listing, ids in (("train", train_list, train_ids), ("test", test_list, test_ids)):
        caches[split] = open_caches(cache_root, split, listing, shas, dims, n_classes, setting)
    for split, listing, ids in (("train", train_list, train_ids), ("test", test_list, test_ids)):
        computed[split] = extract_factors(caches[split], models, factor_args, listing, ids, tf, num_workers, device,
                                          f"factors {split}", phases)
        views[split] = FactorView(caches[split], ids)
    return views, computed
