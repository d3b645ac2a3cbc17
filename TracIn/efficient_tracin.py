"""The TracIn command line: TracIn or a curvature-aware score over every checkpoint, streamed top-k, self-influence.

    $ python -m TracIn.efficient_tracin                                   # influence_last (the default), top-100, fc
    $ python -m TracIn.efficient_tracin --score_fn tracin --top_k 20      # re-scores from the factor cache: no forward pass

This file is the flags; the work is in the library, TracIn/core/: arguments.py (TracInConfig, the settings flat as run.json
records them, checked, and the two stages' argument objects), job.py (one run, shard or merge), factors.py (stage 1: per-example factors (a, d) cached per checkpoint, resumable,
keyed by the image list, the checkpoint's bytes and FactorArguments.key), scores.py + curvature.py (stage 2: blocks of
scores summed over checkpoints before a streamed top-k; the full n_test x n_train matrix never exists), shards.py
(--num_shards N --shard_index i, then --merge: bit-identical to one run; TracIn scores only) and results.py (the files,
run.json last; what each holds: README.md, "Where outputs land"). Every index is a row of
data/processed/manifest.csv's split. docs/method.md explains the method, docs/lds.md the choice of the default.
"""
from __future__ import annotations

import argparse
import logging

from lib.cli import cli, nonneg_int, positive_float, positive_int
from TracIn.core.arguments import DAMPING, NORMALIZE, SCORE_FN, SCORE_FNS, TracInConfig

log = logging.getLogger(__name__)


def parse_args(argv=None) -> TracInConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    D = TracInConfig()  # every default is the config's own
    p.add_argument("--data_dir", default=D.data_dir, help=f"prepared data (default {D.data_dir})")
    p.add_argument("--checkpoint_dir", default=D.checkpoint_dir, help=f"where finetune_epoch_*.pth are (default {D.checkpoint_dir})")
    p.add_argument("--output_dir", default=D.output_dir, help=f"results folder (default {D.output_dir})")
    p.add_argument("--checkpoints", nargs="+", default=[],
                   help="checkpoint files of one training run, taken in the order of their recorded epochs (default: "
                        "--checkpoint_dir's checkpoints up to the model train.py selected, that model last)")
    p.add_argument("--all_checkpoints", action="store_true",
                   help="every checkpoint of --checkpoint_dir (or of each member), not only those up to the selected model")
    p.add_argument("--members", nargs="+", default=[],
                   help="an ensemble: the checkpoint folders of several training runs of the same data (python -m "
                        "TracIn.ensemble trains them); every score, self-influence and prediction is the members' mean, "
                        "each member with its own checkpoints and curvature (default: one run, --checkpoint_dir)")
    p.add_argument("--lr_weights", nargs="+", type=positive_float, default=[], help="lr_t per checkpoint (default: each checkpoint's stored lr)")
    p.add_argument("--layers", nargs="+", default=D.layers,
                   help="target layers: nn.Linear / nn.Conv2d module names or blocks holding them (layer4 = every conv in it); "
                        f"weights and biases (default {' '.join(D.layers)})")
    p.add_argument("--proj_dim", type=nonneg_int, default=D.proj_dim,
                   help="R: conv gradients are projected to R x R per layer from both sides (Kronecker, unbiased); "
                        f"0 = exact (default {D.proj_dim})")
    p.add_argument("--proj_seed", type=nonneg_int, default=D.proj_seed, help=f"seed of the projections, stored with the run (default {D.proj_seed})")
    p.add_argument("--project_linear", action="store_true", help="project linear layers too (default: exact ghost product)")
    p.add_argument("--top_k", type=positive_int, default=D.top_k, help=f"proponents and opponents kept per test image (default {D.top_k})")
    p.add_argument("--batch_size", type=positive_int, default=D.batch_size, help=f"images per forward batch (default {D.batch_size})")
    p.add_argument("--train_subset", type=nonneg_int, default=D.train_subset, help="seeded random subset of N training images (default 0: all)")
    p.add_argument("--test_subset", type=nonneg_int, default=D.test_subset, help="seeded random subset of N test images (default 0: all)")
    p.add_argument("--seed", type=nonneg_int, default=D.seed, help=f"seed of the subsets (default {D.seed})")
    p.add_argument("--test_block", type=positive_int, default=D.test_block, help=f"test rows per score block (default {D.test_block})")
    p.add_argument("--train_block", type=positive_int, default=D.train_block, help=f"train columns per score block (default {D.train_block})")
    p.add_argument("--device", default=D.device, help=f"auto, cpu or cuda[:N] (default {D.device})")
    p.add_argument("--num_workers", type=nonneg_int, default=D.num_workers, help=f"data loader workers (default {D.num_workers})")
    p.add_argument("--no_self_influence", action="store_true", help="skip self_influence.npy")
    p.add_argument("--overwrite", action="store_true", help="delete the cached factors (output_dir/factors) and recompute them")
    p.add_argument("--num_shards", type=positive_int, default=D.num_shards, help=f"split the training set into N shards (default {D.num_shards})")
    p.add_argument("--shard_index", type=nonneg_int, default=D.shard_index, help="which shard this job scores, 0-based (default 0; SLURM_ARRAY_TASK_ID)")
    p.add_argument("--score_fn", choices=SCORE_FNS, default=SCORE_FN,
                   help="influence_last: g(x)^T (H + damping)^{-1} g(z) at the last checkpoint, H the K-FAC curvature of every "
                        "scored layer (TracIn's cost; the best LDS on every data set and setting measured, docs/lds.md); "
                        "influence: the same summed over checkpoints with lr_t; tracin: sum_t lr_t <g_t(x), g_t(z)> (the paper); "
                        f"tracin_last: its last checkpoint alone; trak: TRAK-style projected fc features (default {SCORE_FN})")
    p.add_argument("--damping", type=positive_float, default=DAMPING, help=f"influence/trak damping, x the mean curvature (default {DAMPING:g})")
    p.add_argument("--trak_dim", type=positive_int, default=D.trak_dim, help=f"TRAK-style features per checkpoint (default {D.trak_dim})")
    p.add_argument("--normalize", choices=NORMALIZE, default="",
                   help="tracin only. train: divide by the training image's gradient norm per checkpoint (chosen by "
                        "docs/counterfactual.md's counterfactual table); none: TracIn as in the paper; both: cosine of the two "
                        "gradients per checkpoint (default train for tracin, none otherwise; self-influence is never normalised)")
    p.add_argument("--cache_dir", default=D.cache_dir, help="factor cache folder (default output_dir/factors; point a second run, "
                   "e.g. with another --normalize, at the first run's cache to score without a forward pass; unsharded runs)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for the factor pass on CUDA (faster, approximate; default off)")
    p.add_argument("--merge", action="store_true", help="merge the --num_shards finished shards into the final outputs")
    a = p.parse_args(argv)
    return TracInConfig(**{k: v for k, v in vars(a).items() if k != "no_self_influence"}, self_influence=not a.no_self_influence)


def main(argv=None):
    from TracIn.core.job import tracin_job  # the job: a run, a shard, or the merge

    tracin_job(parse_args(argv))
    return 0


if __name__ == "__main__":
    cli(main)
