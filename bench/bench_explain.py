"""Cost of explaining new images at Animals-10 scale: seconds per query image after the run is loaded.

    $ python -m bench.bench_explain                       # 21,000 cached training rows, ResNet50 at 224 px, 4 checkpoints
    $ python -m bench.bench_explain --n_train 2000 --image_size 64 --batches 1 4    # a quick look

What TracIn.open(...).explain() does per batch of query images, through the same call (run.InfluenceRun.query: the
query images' forward/backward at each checkpoint the method needs, then one streamed pass over the training factors),
on a run built with InfluenceRun's constructor from ready objects: the training side is a synthetic factor set of the
fc layer's real shape (n_train x 2049 inputs, 10 outputs, float32, in memory as a warm page cache holds the
memory-mapped cache); the models are real ResNet50s (random weights: the cost does not depend on them). Loading (the K-FAC factors and their inverse, the squared norms) is timed once, apart.
Prints a table: method, query batch size, seconds per batch, seconds per image, and the share spent in the model.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lib.timing import Phases
from model_architecture import build_model
from TracIn.core.arguments import FactorArguments, TracInConfig
from TracIn.core.methods import DAMPING, FactorSet, method_for
from TracIn.core.run import InfluenceRun, MemoryView


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_train", type=int, default=21000, help="cached training rows (default 21000: Animals-10's train split)")
    p.add_argument("--n_ckpt", type=int, default=4, help="checkpoints (default 4)")
    p.add_argument("--image_size", type=int, default=224, help="query image size (default 224)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="query batch sizes (default 1 8 32)")
    p.add_argument("--methods", nargs="+", default=["influence_last", "tracin"], help="--score_fn values (default influence_last tracin)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per cell, the fastest kept (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, c, f = args.n_train, 10, 2049
    device = torch.device("cpu")
    models = [build_model("resnet50", c, weights=None).eval() for _ in range(args.n_ckpt)]
    fa = FactorArguments(layers=("fc",), batch_size=32)
    # the training side: relu features (non-negative, with the bias 1) and softmax-minus-onehot error signals
    train = []
    for _ in range(args.n_ckpt):
        a = np.abs(rng.standard_normal((n, f), dtype=np.float32))
        a[:, -1] = 1
        p_ = torch.softmax(torch.from_numpy(rng.standard_normal((n, c), dtype=np.float32)), 1).numpy()
        d = p_ - np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
        train.append({"fc": (torch.from_numpy(a), torch.from_numpy(d))})
    train_logits = rng.standard_normal((args.n_ckpt, n, c)).astype(np.float32)
    labels = rng.integers(0, c, n)
    lrs = [1e-3 * (args.n_ckpt - t) / args.n_ckpt for t in range(args.n_ckpt)]
    fs = FactorSet(MemoryView(train, train_logits), None, lrs, ["fc"], labels, np.zeros(0, dtype=np.int64), device,
                   train_logits, np.zeros((args.n_ckpt, 0, c), np.float32))
    run = InfluenceRun(TracInConfig(), device=device, models=models, lrs=lrs, members=[list(range(args.n_ckpt))],
                       factor_args=fa, train_ids=np.arange(n), factor_set=fs)
    print(f"explain cost: {n:,} cached training rows (fc, {f} x {c}), {args.n_ckpt} checkpoints, ResNet50 at "
          f"{args.image_size} px, {torch.get_num_threads()} threads")
    print(f"{'method':<16}{'batch':>6}{'load s':>9}{'s/batch':>9}{'s/image':>9}{'model share':>13}")
    for name in args.methods:
        method = method_for(name, method_for(name).default_normalize)
        t0 = time.perf_counter()  # loading: what the first query pays once (K-FAC moments and inverse, norms)
        if method.curvature == "kfac":
            fs.curvature(method.last_only).whiten(MemoryView(train, train_logits), DAMPING)
        if method.normalize != "none":
            fs.train_sq_norms()
        load = time.perf_counter() - t0
        for b in args.batches:
            best, best_model = float("inf"), 0.0
            for _ in range(args.repeats):
                x = torch.randn(b, 3, args.image_size, args.image_size)
                y = rng.integers(0, c, b)
                phases = Phases()
                with phases("total"):
                    tracker, _ = run.query(x, y, 10, name, method.normalize, phases)
                    assert torch.isfinite(tracker.proponents()[0]).all()
                if phases["total"] < best:
                    best, best_model = phases["total"], phases["seconds_model"]
            print(f"{name:<16}{b:>6}{load:>9.2f}{best:>9.3f}{best / b:>9.3f}{best_model / best:>12.0%}")


if __name__ == "__main__":
    main()
