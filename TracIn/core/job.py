"""One TracIn job: an unsharded run, one shard of a sharded run, or the merge of finished shards.

    from TracIn.core.arguments import TracInConfig
    from TracIn.core.job import tracin_job
    summary = tracin_job(TracInConfig(top_k=20))     # what python -m TracIn.efficient_tracin --top_k 20 does

The job resolves its inputs once (run.InfluenceRun.from_config: the splits, the chosen rows, the checkpoints, their
models, the layers), checks them before any work, runs stages 1 and 2 (`scored = run.score(score_args, shard_ids,
cache_root)`) and hands the scored run to its one writer: results.tracin_outputs + write_run (a run, or the merge) or
shards.write_shard (a shard). It returns its summary with the seconds of each phase (seconds_setup,
seconds_image_check, seconds_factors and its parts, seconds_scores, seconds_outputs), which bench/bench_tracin.py prints.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from lib.cli import UserError
from lib.devices import resolve_device
from lib.files import ensure_output_dir, is_relative_to
from lib.ownership import recorded_by_others
from lib.timing import Phases
from TracIn.core.factors import OWNER, check_images
from TracIn.core.results import ARRAYS, RECORD, TABLES, check_writable_names, previous_method, tracin_outputs, write_run
from TracIn.core.run import InfluenceRun
from TracIn.core.shards import merge_shards, write_shard

log = logging.getLogger(__name__)


def tracin_job(cfg) -> dict:
    """One unsharded run, one shard (--num_shards > 1), or the merge of finished shards (--merge); returns its summary
    (the run's, the shard's or the merge's) with the seconds of each phase."""
    t_start, phases = time.time(), Phases()
    resolve_device(cfg.device)  # a bad --device is the first thing said
    if cfg.cache_dir and is_relative_to(Path(cfg.output_dir), Path(cfg.cache_dir)):  # --overwrite clears the cache
        raise UserError(f"--cache_dir {cfg.cache_dir} is (or holds) the --output_dir {cfg.output_dir}; a folder is a cache or an "
                        "output, not both: pass a cache folder of its own (default output_dir/factors)")
    out = ensure_output_dir(cfg.output_dir, "--output_dir")
    others = recorded_by_others(out, OWNER.name)
    if others and not (out / RECORD).exists():  # another tool's output folder (false_predictions/, an evaluation)
        raise UserError(f"--output_dir {out} holds files {', '.join(others)} wrote and no TracIn run; pass another --output_dir")
    with phases("seconds_setup"):
        run = InfluenceRun.from_config(cfg)
    log.info(f"explaining {run.chosen}: epochs {', '.join(str(c['epoch']) for c in run.ckpts)}")
    if cfg.top_k > len(run.train_ids):
        raise UserError(f"--top_k {cfg.top_k} is larger than the {len(run.train_ids)} training images scored; lower --top_k")
    # Shards are whole units of lcm(batch_size, train_block) images, so every forward batch and
    # every score block is the one the unsharded run computes: the merge is bit-identical.
    unit = math.lcm(cfg.batch_size, cfg.train_block)
    n_units = -(-len(run.train_ids) // unit)
    if cfg.num_shards > n_units:
        raise UserError(f"--num_shards {cfg.num_shards} is more than the {n_units} shard unit(s) of lcm(--batch_size, --train_block) "
                        f"= {unit} training images; lower --train_block or --num_shards")
    identity = run.identity()
    if cfg.merge or cfg.num_shards == 1:  # a folder or symlink where a results file goes: refused before any work
        check_writable_names(out, [f"{a}.npy" for a in ARRAYS] + list(TABLES) + [RECORD])
    work_dir = out / "shards" / f"shard_{cfg.shard_index:03d}" if cfg.num_shards > 1 else out
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else work_dir / "factors"
    if not cfg.merge:
        with phases("seconds_image_check"):
            check_images(run.train_list, run.train_ids)
            check_images(run.test_list, run.test_ids)
        if cfg.num_shards > 1:  # this shard is not finished until written again
            OWNER.folder(work_dir, "--output_dir").fill().remove(work_dir / "complete.json")
        # only a cache this script marked as its own; --overwrite: what it recorded there goes first
        cache = OWNER.folder(cache_root, "--cache_dir" if cfg.cache_dir else "--output_dir").fill(start_over=cfg.overwrite)

    if cfg.merge:
        scored = merge_shards(out, cfg.num_shards, identity, run.device)
    else:
        units = np.array_split(np.arange(n_units), cfg.num_shards)[cfg.shard_index]
        shard_ids = run.train_ids[units[0] * unit: (units[-1] + 1) * unit] if cfg.num_shards > 1 else run.train_ids
        scored = run.score(cfg.score_args(), shard_ids, cache_root)
        cache.seal()  # the factor files are filled: their sha256 from now on proves them (make clean-results)
        if cfg.num_shards > 1:
            write_shard(work_dir, scored, {"shard_index": cfg.shard_index, "n_train": len(shard_ids),
                                           "seconds": time.time() - t_start, "identity": identity})
            log.info(f"TracIn shard {cfg.shard_index + 1}/{cfg.num_shards}: {len(shard_ids)} train x {len(run.test_ids)} test "
                     f"in {time.time() - t_start:.1f}s; run with --merge once every shard is done")
            return {"shard_index": cfg.shard_index, "n_train": len(shard_ids), **scored.summary, **phases}
    with phases("seconds_outputs"):
        arrays, tables, record, summary = tracin_outputs(run, identity, scored, t_start)
        now, old = f"--score_fn {cfg.score_fn} --normalize {cfg.normalize}", previous_method(out)
        if old is not None and old != now:
            log.warning(f"warning: replacing results of {old} in {out} with {now} (use another --output_dir to keep both)")
        write_run(out, arrays, tables, record)
    log.info(f"TracIn: {summary['pairs_scored']:,} pairs scored ({summary['n_test']} test x {summary['n_train']} train, "
             f"{summary['n_checkpoints']} checkpoints, layers {','.join(run.layers)}, --score_fn {cfg.score_fn}) in "
             f"{summary['seconds_total']:.1f}s (forward batches run: {summary['batches_computed']}); negative share among "
             f"opponents {summary['opponent_negative_share']:.1%}; outputs in {out}")
    return {**summary, **phases}
