"""Benchmark TracIn: the forward-pass floor, this implementation, and Captum's TracInCPFast.

    $ make demo                          # once: data/processed and 4 ResNet50 checkpoints
    $ .venv/bin/python bench/bench_tracin.py --n_train 2000 --n_test 500
    $ .venv/bin/python bench/bench_tracin.py --skip_captum --memory_sizes 20000 50000 200000

Part 1 (one model, data set and checkpoint set; the same loader for all three):
  (a) floor: each checkpoint loaded, each image decoded once, a forward pass through every
      checkpoint, nothing else;
  (b) TracIn/efficient_tracin.py end to end (factors, exact scores, top-k both ways, self-influence);
  (c) Captum TracInCPFast (fc layer) for the same top-k proponents and opponents.
Part 2: the scoring stage alone on random factors (ResNet50 fc: a 2049-d, d 10-d), in a fresh
process per size, reporting its peak anonymous memory (RssAnon), which must stay flat as
n_train grows because scores only ever exist block by block.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--checkpoint_dir", default="models/checkpoints", help="checkpoints (default models/checkpoints)")
    p.add_argument("--n_train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--n_test", type=int, default=500, help="test images (default 500)")
    p.add_argument("--top_k", type=int, default=100, help="k (default 100)")
    p.add_argument("--batch_size", type=int, default=64, help="batch size for all three (default 64)")
    p.add_argument("--num_workers", type=int, default=2, help="loader workers (default 2)")
    p.add_argument("--skip_captum", action="store_true", help="skip (c)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of (a) and (b); medians reported (default 3)")
    p.add_argument("--memory_sizes", type=int, nargs="*", default=[20000, 50000, 200000], help="n_train values for part 2")
    p.add_argument("--memory_n_test", type=int, default=5000, help="n_test for part 2 (default 5000)")
    p.add_argument("--_memory_child", nargs=3, type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class PairDataset(torch.utils.data.Dataset):
    """(x, y) view of an ImageListDataset: Captum wants the label last."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y, _ = self.ds[i]
        return x, y


def part1(args):
    from lib.data_utils import ImageListDataset, build_transform, list_split
    from lib.checkpoints import find_checkpoints, load_checkpoint, model_from_checkpoint
    from TracIn.core.arguments import TracInConfig
    from TracIn.core.factors import choose_subset
    from TracIn.core.job import tracin_job
    from TracIn.core.results import load_results

    paths = find_checkpoints(args.checkpoint_dir)
    if not paths:
        sys.exit(f"error: no checkpoints in {args.checkpoint_dir}; run `make demo` first")
    ckpts = [load_checkpoint(p) for p in paths]
    models = [model_from_checkpoint(c) for c in ckpts]
    train_list, test_list = list_split(args.data_dir, "train"), list_split(args.data_dir, "test")
    train_ids = choose_subset(len(train_list.paths), args.n_train, 0)
    test_ids = choose_subset(len(test_list.paths), args.n_test, 1)
    tf = build_transform(ckpts[0]["image_size"], train=False)
    train_ds, test_ds = ImageListDataset(train_list, tf, train_ids), ImageListDataset(test_list, tf, test_ids)
    rows = []

    def floor():
        # what any TracIn must do at least: load each checkpoint, decode each image, forward passes
        models = [model_from_checkpoint(load_checkpoint(p)) for p in paths]
        with torch.no_grad():
            for ds in (train_ds, test_ds):
                for x, _, _ in torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers):
                    for m in models:
                        m(x)

    phases = []  # per run of (b): the job's own seconds per phase (its summary)

    def ours():
        with tempfile.TemporaryDirectory() as out:
            cfg = TracInConfig(data_dir=args.data_dir, checkpoint_dir=args.checkpoint_dir, output_dir=out,
                               top_k=args.top_k, batch_size=args.batch_size, train_subset=args.n_train,
                               test_subset=args.n_test, num_workers=args.num_workers, score_fn="tracin")
            phases.append(tracin_job(cfg))
            idx = np.asarray(load_results(out)["top_k_influences_indices"])
        return idx

    with torch.no_grad():  # warm-up: kernels and caches, so neither side pays the cold start
        for m in models:
            m(test_ds[0][0].unsqueeze(0))
    times = {"a": [], "b": []}
    for _ in range(args.repeats):  # alternate a, b, a, b, ...: machine noise hits both
        t0 = time.time()
        floor()
        times["a"].append(time.time() - t0)
        t0 = time.time()
        ours_idx = ours()
        times["b"].append(time.time() - t0)
    t_floor, t_ours = float(np.median(times["a"])), float(np.median(times["b"]))
    spread = lambda ts: f"median of {len(ts)}: {', '.join(f'{t:.1f}' for t in ts)}"
    rows.append(("(a) floor: load ckpts, decode once, forward x checkpoints", t_floor, spread(times["a"])))
    rows.append(("(b) efficient_tracin (fc weight+bias), end to end", t_ours, spread(times["b"])))

    t_captum, overlap = None, None
    if not args.skip_captum:
        from captum.influence import TracInCPFast

        def load(m, path):
            c = load_checkpoint(path)
            m.load_state_dict(c["model_state"])
            m.eval()
            return c["lr"]

        model = model_from_checkpoint(ckpts[0])
        loader = torch.utils.data.DataLoader(PairDataset(train_ds), batch_size=args.batch_size, num_workers=args.num_workers)
        t0 = time.time()
        x_te = torch.stack([test_ds[i][0] for i in range(len(test_ds))])
        y_te = torch.as_tensor([test_ds[i][1] for i in range(len(test_ds))])
        tracin = TracInCPFast(model, "fc", loader, [str(p) for p in paths], load,
                              loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=args.batch_size)
        prop = tracin.influence((x_te, y_te), k=args.top_k, proponents=True)
        tracin.influence((x_te, y_te), k=args.top_k, proponents=False)
        t_captum = time.time() - t0
        captum_idx = train_ids[prop[0].numpy()]
        overlap = float(np.mean([len(set(a) & set(b)) / args.top_k for a, b in zip(ours_idx, captum_idx)]))
        rows.append(("(c) Captum TracInCPFast (fc weight), proponents + opponents", t_captum, "1 run"))

    print(f"\nPart 1: {ckpts[0]['arch']} at {ckpts[0]['image_size']} px, {len(train_ids)} train x {len(test_ids)} test, "
          f"{len(paths)} checkpoints, top-{args.top_k}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"| {'method':<60} | {'seconds':>8} | {'x floor':>7} | {'runs (s)':<32} |")
    print(f"|{'-' * 62}|{'-' * 10}|{'-' * 9}|{'-' * 34}|")
    for name, sec, runs in rows:
        print(f"| {name:<60} | {sec:8.1f} | {sec / t_floor:7.2f} | {runs:<32} |")
    print_phases(phases, times["b"], t_floor)
    if t_captum:
        print(f"speed-up of (b) over (c): {t_captum / t_ours:.2f}x; mean top-{args.top_k} proponent overlap (b) vs (c): "
              f"{overlap:.3f} (Captum's fast variant omits the bias gradient)")


def phase_rows(phases: list[dict], total: float) -> list[tuple[str, float]]:
    """(phase, median seconds) of the job's summaries (tracin_job's seconds_* figures, none measured here), the rest
    of `total` (the wall time of a run) last."""
    med = lambda key: float(np.median([p.get(f"seconds_{key}", 0.0) for p in phases]))
    inner = med("forward_backward") + med("cache_writes") + med("models")
    top = ("setup", "image_check", "factors", "scores", "outputs")
    return [("set-up: listings, checkpoints loaded and sha256-hashed, models built", med("setup")),
            ("image check (headers, JPEG end markers)", med("image_check")),
            ("factor pass", med("factors")),
            ("  of which forward + backward batches", med("forward_backward")),
            ("  of which models put on the device", med("models")),
            ("  of which factor cache writes and flushes", med("cache_writes")),
            ("  of which the loader's waits and the rest", med("factors") - inner),
            ("scores: blocks, top-k, self-influence", med("scores")),
            ("outputs: tables, arrays, run.json", med("outputs")),
            ("rest (folders, ownership, identity)", total - sum(med(k) for k in top))]


def print_phases(phases: list[dict], totals: list[float], t_floor: float) -> None:
    """Where (b)'s time goes (medians over the runs), beside the floor."""
    total = float(np.median(totals))
    rows = phase_rows(phases, total)
    print(f"\nWhere (b)'s time goes (median of {len(phases)} runs; (a) floor {t_floor:.1f} s)")
    print(f"| {'phase':<56} | {'seconds':>8} | {'share':>6} |")
    print(f"|{'-' * 58}|{'-' * 10}|{'-' * 8}|")
    for name, sec in rows:
        print(f"| {name:<56} | {sec:8.2f} | {sec / total:6.1%} |")


def memory_child(n_train, n_test, top_k):
    """Score random factors; print peak RssAnon (MiB) and seconds as JSON."""
    from TracIn.core.factors import CheckpointFactors, FactorView
    from TracIn.core.scores import score_topk

    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            time.sleep(0.02)

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        dims = {"fc": (2049, 10)}
        stores = {}
        rng = np.random.default_rng(0)
        for split, n in (("train", n_train), ("test", n_test)):
            s = CheckpointFactors(Path(d) / split, n, dims, 10, {"split": split}, Path(d))
            for r0 in range(0, n, 20000):
                r = slice(r0, min(r0 + 20000, n))
                s.arrays[("fc", "A")][r] = rng.standard_normal((r.stop - r.start, 2049), dtype=np.float32)
                s.arrays[("fc", "D")][r] = rng.standard_normal((r.stop - r.start, 10), dtype=np.float32)
            s.sync()
            stores[split] = FactorView([s], np.arange(n))
        t = threading.Thread(target=sample, daemon=True)
        with open("/proc/self/status") as f:
            base = next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))
        t.start()
        t0 = time.time()
        score_topk(stores["test"], stores["train"], n_test, n_train, ["fc"], [1.0], top_k, 1024, 8192,
                   np.arange(n_train), torch.device("cpu"))
        secs = time.time() - t0
        stop.set()
        t.join()
    print(json.dumps({"peak_anon_mib": peak[0] / 1024, "base_anon_mib": base / 1024, "seconds": secs}))


def part2(args):
    print(f"\nPart 2: scoring stage on random factors (a 2049-d, d 10-d, 1 checkpoint), n_test {args.memory_n_test}, "
          f"top-{args.top_k}, blocks 1024 x 8192")
    print(f"| {'n_train':>8} | {'pairs':>14} | {'seconds':>8} | {'Mpairs/s':>8} | {'peak RssAnon MiB':>16} | {'growth over start':>17} |")
    print(f"|{'-' * 10}|{'-' * 16}|{'-' * 10}|{'-' * 10}|{'-' * 18}|{'-' * 19}|")
    for n in args.memory_sizes:
        out = subprocess.run([sys.executable, __file__, "--_memory_child", str(n), str(args.memory_n_test), str(args.top_k)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        pairs = n * args.memory_n_test
        print(f"| {n:>8} | {pairs:>14,} | {r['seconds']:8.1f} | {pairs / r['seconds'] / 1e6:8.1f} | "
              f"{r['peak_anon_mib']:16.0f} | {r['peak_anon_mib'] - r['base_anon_mib']:17.0f} |")


def main():
    args = parse_args()
    if args._memory_child:
        memory_child(*args._memory_child)
        return
    part1(args)
    if args.memory_sizes:
        part2(args)


if __name__ == "__main__":
    main()
