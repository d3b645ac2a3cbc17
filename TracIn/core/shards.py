"""Sharded TracIn (SLURM arrays, slurm_tracin.sh): each shard's files, and the exact merge of finished shards.

Shards are whole units of lcm(batch_size, train_block) training images, so every forward batch and every score block
is the one the unsharded run computes: top-k lists merge and per-image arrays concatenate to the same bits.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lib.cli import UserError
from lib.files import load_npy, read_json, save_json, save_npy
from TracIn.core.scores import ScoredRun
from TracIn.core.topk import TopKInfluenceTracker


TRACKER_ARRAYS = ("prop_values", "prop_indices", "opp_values", "opp_indices")
TRAIN_ARRAYS = ("self_influence", "train_ids", "loss_last", "pred_last", "loss_per_ckpt", "margin_per_ckpt", "el2n_per_ckpt",
               "grad_sq_norm_per_ckpt")


def write_shard(work_dir: Path, scored: ScoredRun, complete: dict) -> None:
    """One finished shard's files in its folder, complete.json (its identity) last."""
    for name in TRACKER_ARRAYS:
        save_npy(work_dir / f"{name}.npy", scored.tracker.state()[name].numpy())
    for name in TRAIN_ARRAYS:
        if scored.train_arrays.get(name) is not None:
            save_npy(work_dir / f"{name}.npy", scored.train_arrays[name])
    save_npy(work_dir / "test_pred.npy", scored.test_pred)
    save_json(work_dir / "complete.json", complete)


def merge_shards(out: Path, num_shards: int, identity: dict, device) -> ScoredRun:
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
    tracker, per_shard = None, {k: [] for k in TRAIN_ARRAYS}
    for d in dirs:
        state = {k: torch.from_numpy(np.array(load_npy(d / f"{k}.npy", None, fix))) for k in TRACKER_ARRAYS}
        t = TopKInfluenceTracker.from_state(state, device=device)
        tracker = t if tracker is None else tracker.merge(t)
        for k in per_shard:
            if (d / f"{k}.npy").exists():
                per_shard[k].append(load_npy(d / f"{k}.npy", None, fix))
    axis = {k: 1 for k in TRAIN_ARRAYS if k.endswith("_per_ckpt")}
    merged = {k: (np.concatenate(v, axis=axis.get(k, 0)) if v else None) for k, v in per_shard.items()}
    seconds = sum(float(complete[d.name].get("seconds", 0.0)) for d in dirs)
    return ScoredRun(tracker, merged, load_npy(dirs[0] / "test_pred.npy", None, fix),
                     {"seconds_factors": seconds, "batches_computed": "merged"})


