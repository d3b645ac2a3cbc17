"""One TracIn job: an unsharded run, one shard of a sharded run, or the merge of finished shards.

    from TracIn.efficient_tracin import parse_args
    from TracIn.job import tracin_job
    summary = tracin_job(parse_args(["--top_k", "20"]))     # what python -m TracIn.efficient_tracin --top_k 20 does

The job reads its inputs (RunInputs: the splits, the chosen rows, the checkpoints), checks them before any work,
runs stage 1 and 2 (scores.factors_and_scores, with the run's FactorArguments and ScoreArguments) and hands the
scored run to its one writer: results.write_tracin_run (a run, or the merge) or shards.write_shard (a shard).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import (OWNER_MARKER, UserError, ensure_output_dir, is_relative_to, mark_owned, owned_by, remove_inside_owned,
                    remove_owned, resolve_device)
from data_utils import SplitListing, data_identity, list_split
from model_architecture import model_from_checkpoint
from TracIn.factors import TOOL, check_images, choose_subset, factor_setting, load_checkpoints, make_hook
from TracIn.influence_utils import target_layers
from TracIn.results import ARRAYS, RECORD, TABLES, check_writable_names, write_tracin_run
from TracIn.scores import factors_and_scores
from TracIn.shards import merge_shards, write_shard

log = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """What one job reads: both splits, the rows scored (split indices), and the checkpoints with their lr_t and sha256."""

    train_list: SplitListing
    test_list: SplitListing
    train_ids: np.ndarray
    test_ids: np.ndarray
    paths: list
    ckpts: list
    lrs: list
    shas: list


def tracin_job(cfg, _stop_after_batches: int | None = None) -> dict:
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
    inputs = RunInputs(train_list, test_list, train_ids, test_ids, paths, ckpts, lrs, shas)
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
        scored = merge_shards(out, cfg.num_shards, identity, device)
    else:
        units = np.array_split(np.arange(n_units), cfg.num_shards)[cfg.shard_index]
        shard_ids = train_ids[units[0] * unit: (units[-1] + 1) * unit] if cfg.num_shards > 1 else train_ids
        if cache_root.exists() and any(cache_root.iterdir()) and not owned_by(cache_root, TOOL):
            raise UserError(f"{cache_root} was not written by {TOOL} (no {OWNER_MARKER} marker); pass another --output_dir")
        mark_owned(cache_root, TOOL)
        if cfg.num_shards > 1:
            mark_owned(work_dir, TOOL)
            remove_inside_owned(work_dir / "complete.json", work_dir, TOOL)  # this shard is not finished until written again
        scored = factors_and_scores(cfg.factor_args(), cfg.score_args(), device, ckpts, shas, lrs, train_list, test_list,
                                    shard_ids, test_ids, cache_root, cfg.num_workers, _stop_after_batches)
        if cfg.num_shards > 1:
            write_shard(work_dir, scored, {"shard_index": cfg.shard_index, "n_train": len(shard_ids),
                                           "seconds": time.time() - t_start, "identity": identity})
            log.info(f"TracIn shard {cfg.shard_index + 1}/{cfg.num_shards}: {len(shard_ids)} train x {len(test_ids)} test "
                     f"in {time.time() - t_start:.1f}s; run with --merge once every shard is done")
            return {"shard_index": cfg.shard_index, "n_train": len(shard_ids), **scored.summary}
    return write_tracin_run(out, cfg, identity, inputs, scored, device, t_start)
