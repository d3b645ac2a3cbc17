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
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common import (OWNER_MARKER, UserError, cli, ensure_output_dir, git_commit, is_relative_to, mark_owned, nonneg_int,
                    owned_by, positive_float, positive_int, remove_owned, resolve_device, save_json, save_npy)
from data_utils import data_identity, list_split
from model_architecture import model_from_checkpoint
from TracIn.factors import TOOL, check_images, choose_subset, factor_setting, load_checkpoints, make_hook
from TracIn.influence_utils import target_layers
from TracIn.results import ARRAYS, RECORD, TABLES, check_writable_names, write_run
from TracIn.arguments import DAMPING, NORMALIZE, SCORE_FN, SCORE_FNS, FactorArguments, ScoreArguments, pick
from TracIn.scores import factors_and_scores
from TracIn.shards import SHARD_ARRAYS, SHARD_PARTS, merge_shards

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
    normalize: str = ""
    score_fn: str = SCORE_FN
    damping: float = DAMPING
    trak_dim: int = 2048
    cache_dir: str = ""
    proj_dim: int = 16
    proj_seed: int = 0
    project_linear: bool = False

    def __post_init__(self):
        if not self.normalize:  # TracIn's lists are normalised by default; the curvature-aware scores are not
            self.normalize = "train" if self.score_fn.startswith("tracin") else "none"
        self.factor_args()  # each stage's arguments check themselves
        self.score_args()
        if self.train_subset < 0 or self.test_subset < 0:
            raise UserError("--train_subset/--test_subset must be >= 0 (0 means the whole split)")
        if any(not np.isfinite(w) or w <= 0 for w in self.lr_weights):
            raise UserError("--lr_weights must be positive numbers")
        if self.cache_dir and self.num_shards > 1:
            raise UserError("--cache_dir is for unsharded runs; each shard keeps its factors in its own folder")
        if self.num_shards > 1 and self.score_fn not in ("tracin", "tracin_last"):
            raise UserError(f"--score_fn {self.score_fn} needs the whole training set's curvature, which one shard does not "
                            "have; shard with --score_fn tracin or tracin_last, or run unsharded")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise UserError(f"--shard_index must be in [0, --num_shards) (got {self.shard_index} of {self.num_shards})")

    def factor_args(self) -> FactorArguments:
        return pick(FactorArguments, self)

    def score_args(self) -> ScoreArguments:
        return pick(ScoreArguments, self)


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
    p.add_argument("--score_fn", choices=SCORE_FNS, default=SCORE_FN,
                   help="influence_last: g(x)^T (H + damping)^{-1} g(z) at the last checkpoint, H the K-FAC curvature of every "
                        "scored layer (TracIn's cost; the best LDS on every data set and setting measured, docs/lds.md); "
                        "influence: the same summed over checkpoints with lr_t; tracin: sum_t lr_t <g_t(x), g_t(z)> (the paper); "
                        f"tracin_last: its last checkpoint alone; trak: TRAK-style projected fc features (default {SCORE_FN})")
    p.add_argument("--damping", type=positive_float, default=DAMPING, help=f"influence/trak damping, x the mean curvature (default {DAMPING:g})")
    p.add_argument("--trak_dim", type=positive_int, default=2048, help="TRAK-style features per checkpoint (default 2048)")
    p.add_argument("--normalize", choices=NORMALIZE, default="",
                   help="tracin only. train: divide by the training image's gradient norm per checkpoint (chosen by "
                        "docs/counterfactual.md's counterfactual table); none: TracIn as in the paper; both: cosine of the two "
                        "gradients per checkpoint (default train for tracin, none otherwise; self-influence is never normalised)")
    p.add_argument("--cache_dir", default="", help="factor cache folder (default output_dir/factors; point a second run, "
                   "e.g. with another --normalize, at the first run's cache to score without a forward pass; unsharded runs)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the factor pass on CUDA (faster, approximate; default off)")
    p.add_argument("--merge", action="store_true", help="merge the --num_shards finished shards into the final outputs")
    a = p.parse_args(argv)
    return TracInConfig(**{k: v for k, v in vars(a).items() if k != "no_self_influence"}, self_influence=not a.no_self_influence)


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
        make_hook(model0, cfg.factor_args())
    except ValueError as e:
        raise UserError(str(e)) from None
    # What the scores depend on (the factors' own identity is their cache key).
    data_id = data_identity(cfg.data_dir)
    identity = {**data_id, "checkpoint_sha256": shas, "lr_weights": lrs,
                "layers": cfg.layers, "top_k": cfg.top_k, "batch_size": cfg.batch_size, "train_subset": cfg.train_subset,
                "test_subset": cfg.test_subset, "seed": cfg.seed, "self_influence": cfg.self_influence,
                "num_shards": cfg.num_shards, "amp": cfg.amp, "normalize": cfg.normalize, **cfg.score_args().key(), "train_block": cfg.train_block, "test_block": cfg.test_block,
                "factors": factor_setting(cfg.factor_args(), model0)}
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
        tracker, parts, test_pred, summary_extra = factors_and_scores(cfg.factor_args(), cfg.score_args(), device, ckpts, shas, lrs,
                                                                      train_list, test_list, shard_ids, test_ids, cache_root,
                                                                      cfg.num_workers, _stop_after_batches)
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
    now = f"--score_fn {cfg.score_fn} --normalize {cfg.normalize}"
    try:  # a corrupt or foreign record is simply replaced
        was = json.loads((out / "run.json").read_text())["args"]
        old = f"--score_fn {was.get('score_fn', 'tracin')} --normalize {was['normalize']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        old = now
    if old != now:
        log.warning(f"warning: replacing results of {old} in {out} with {now} (use another --output_dir to keep both)")
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
