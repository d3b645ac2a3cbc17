"""GPU benchmark: CUDA-vs-CPU agreement, training images/s and TracIn at Animals-10 scale.

    $ python3 -m bench.bench_gpu                 # on a GPU machine, from the repo root (no venv needed)
    $ python3 -m bench.bench_gpu --smoke         # tiny sizes on the CPU, to check the script runs
    $ python -m bench.bench_gpu --device cpu --skip_e2e --batch_size 16 --steps 2   # CPU rates (README)

Parts, in the order they run (sized to finish well under 8 minutes on one H200):
0. agreement: efficient_tracin on a small subset on the GPU (TF32 off) and on the CPU; the
   largest relative differences of the top-k values and of self-influence, and the share of
   top-k indices that agree, must be within float32 round-off.
1. ResNet50 training steps on random 224 px tensors (bf16 autocast, channels_last, Adam).
2. the TracIn factor pass alone (all checkpoints resident) in fp32 and bf16, random tensors.
3. the scoring stage on random factors of the full size held on the GPU (blocked exact
   scores, top-k proponents and opponents, self-influence).
4. end to end: a TracIn job (TracIn.job.tracin_job) as efficient_tracin runs it, on synthetic JPEGs of Animals-10's
   count and typical size (20,893 train x 5,224 test, 300 x 225 px, 10 class folders) and 8
   ResNet50 checkpoints, top-100; JPEG decoding, the factor cache on disk and every output
   file included. Also the loader alone (decode + resize), to show which side bounds it.
Random weights: TracIn's cost does not depend on what the checkpoints learnt.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ["cane", "cavallo", "elefante", "farfalla", "gallina", "gatto", "mucca", "pecora", "ragno", "scoiattolo"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_train", type=int, default=20893, help="training images (default 20893, Animals-10's 80%%)")
    p.add_argument("--n_test", type=int, default=5224, help="test images (default 5224)")
    p.add_argument("--checkpoints", type=int, default=8, help="checkpoints (default 8)")
    p.add_argument("--top_k", type=int, default=100, help="k (default 100)")
    p.add_argument("--batch_size", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--image_size", type=int, default=224, help="model input size (default 224)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (default 30)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="loader workers (default min(16, cores))")
    p.add_argument("--work_dir", default=None, help="scratch folder for JPEGs, checkpoints and outputs (default a temp dir)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: cuda if there is one (default); cpu measures rates for the CPU row of docs/scale.md (part 0 skipped)")
    p.add_argument("--skip_e2e", action="store_true", help="skip part 4 (the end-to-end run)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device is there")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, steps, warmup=3):
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.time()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.time() - t0) / steps


def set_tf32(on: bool):
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on


# ---------------------------------------------------------------- synthetic Animals-10-like data
def _write_jpeg(job):
    path, seed, (w, h) = job
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth blobs + grain: photo-like JPEG sizes
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, "JPEG", quality=90)


def make_image_tree(root: Path, n_train: int, n_test: int, workers: int):
    jobs = []
    for split, n in (("train", n_train), ("test", n_test)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            size = (300, 225) if i % 4 else (225, 300)
            jobs.append((root / split / CLASSES[i % len(CLASSES)] / f"{split}_{i:06d}.jpeg", len(jobs), size))
    with Pool(max(1, workers)) as pool:
        pool.map(_write_jpeg, jobs, chunksize=64)


def make_checkpoints(ckpt_dir: Path, n: int, image_size: int, arch: str = "resnet50"):
    from lib.data_utils import IMAGENET_MEAN, IMAGENET_STD
    from lib.checkpoints import make_checkpoint, save_checkpoint
    from model_architecture import build_model

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for t in range(n):
        torch.manual_seed(t)
        m = build_model(arch, len(CLASSES)).eval()
        save_checkpoint(make_checkpoint(m, arch=arch, class_names=CLASSES, image_size=image_size, mean=IMAGENET_MEAN,
                                        std=IMAGENET_STD, epoch=t + 1, lr=1e-4 * (n - t) / n, metrics={}),
                        ckpt_dir / f"finetune_epoch_{t + 1}.pth")
    return sorted(ckpt_dir.glob("finetune_epoch_*.pth"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def tracin(data, ckpts, out, device, bs=64, workers=2, top_k=10, **settings):
    from TracIn.core.arguments import TracInConfig
    from TracIn.core.job import tracin_job

    return tracin_job(TracInConfig(data_dir=str(data), checkpoints=list(map(str, ckpts)), output_dir=str(out), device=device,
                                   batch_size=bs, num_workers=workers, top_k=top_k, **settings))


def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ---------------------------------------------------------------- parts
def part0_agreement(work, data, ckpts, device, args):
    """GPU vs CPU on the same subset; TF32 off so both are float32 throughout."""
    set_tf32(False)
    sub = {"train_subset": min(args.n_train, 256), "test_subset": min(args.n_test, 32)}
    tracin(data, ckpts[:2], work / "agree_cpu", "cpu", workers=args.workers, **sub)
    tracin(data, ckpts[:2], work / "agree_dev", device.type, workers=args.workers, **sub)
    set_tf32(True)
    from TracIn.core.results import load_results

    c, g = load_results(work / "agree_cpu"), load_results(work / "agree_dev")
    idx = np.mean([np.mean(g[k] == c[k]) for k in ("top_k_influences_indices", "top_k_opponents_indices")])
    res = {"top-k values, max rel diff": max(rel(g[k], c[k]) for k in ("top_k_influences_values", "top_k_opponents_values")),
           "self-influence, max rel diff": rel(g["self_influence"], c["self_influence"]),
           "top-k indices equal (share)": float(idx)}
    ok = bool(res["top-k values, max rel diff"] < 1e-3 and res["self-influence, max rel diff"] < 1e-3 and idx > 0.98)
    return res, ok


def random_batch(device, args):
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    return x.contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (args.batch_size,), device=device)


def part1_training(device, args, amp):
    from model_architecture import build_model

    bs = args.batch_size
    x, y = random_batch(device, args)
    model = build_model("resnet50", 10).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step():
        with amp():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ips = bs / timed(step, device, args.steps)
    kind = "bf16 + channels_last" if device.type == "cuda" else "fp32"
    return (f"training step, {kind} (img/s)", ips, f"epoch of {args.n_train}: {args.n_train / ips:.1f}s")


def part2_factor_pass(device, args, amp):
    from model_architecture import build_model
    from TracIn.core.ghost import InfluenceHook

    bs = args.batch_size
    x, y = random_batch(device, args)
    models = [build_model("resnet50", 10).to(device).to(memory_format=torch.channels_last).eval() for _ in range(args.checkpoints)]
    hooks = [InfluenceHook(m, ["fc"]).__enter__() for m in models]
    rows, rates = [], {}
    modes = (("fp32 (TF32 convs)", False), ("bf16", True)) if device.type == "cuda" else (("fp32", False),)
    for label, use_amp in modes:
        def step():
            for h in hooks:
                with amp() if use_amp else torch.autocast(device.type, enabled=False):
                    f, _, _ = h.factors(x, y)
                f["fc"][0].float(), f["fc"][1].float()

        rates[label] = bs * args.checkpoints / timed(step, device, max(2, args.steps // 3))
        total = (args.n_train + args.n_test) * args.checkpoints / rates[label]
        rows.append((f"factor pass alone, {label} (img x ckpt / s)", rates[label], f"all images x {args.checkpoints} ckpts: {total:.1f}s"))
    for h in hooks:
        h.release()
    return rows


def part3_scoring(device, args):
    from TracIn.core.factors import ResidentFactors
    from TracIn.core.scores import score_topk
    from TracIn.core.ghost import self_influence

    g = torch.Generator(device=device).manual_seed(0)

    def factors(n):
        return {(t, "fc", k): torch.randn(n, d, device=device, generator=g)
                for t in range(args.checkpoints) for k, d in (("A", 2049), ("D", 10))}

    tr, te = ResidentFactors(factors(args.n_train)), ResidentFactors(factors(args.n_test))
    lrs = [1e-4] * args.checkpoints
    sync(device)
    t0 = time.time()
    tracker = score_topk(te, tr, args.n_test, args.n_train, ["fc"], lrs, args.top_k, 2048, 32768, np.arange(args.n_train), device)
    self_inf = self_influence([{"fc": (tr.tensors[(t, "fc", "A")], tr.tensors[(t, "fc", "D")])} for t in range(len(lrs))], lrs)
    _ = tracker.proponents()[0].cpu(), tracker.opponents()[0].cpu(), self_inf.cpu()
    sync(device)
    seconds = time.time() - t0
    pairs = args.n_train * args.n_test
    return ("scoring + top-k both ways + self-influence (Mpairs/s)", pairs / seconds / 1e6, f"{pairs:,} pairs: {seconds:.1f}s")


def part4_end_to_end(work, data, ckpts, device, args):
    from lib.data_utils import ImageListDataset, build_transform, list_split, make_loader

    listing = list_split(data, "train")
    loader = make_loader(ImageListDataset(listing, build_transform(args.image_size, train=False)), args.batch_size,
                         shuffle=False, num_workers=args.workers)
    t0 = time.time()
    for _ in loader:
        pass
    decode_ips = len(listing.paths) / (time.time() - t0)
    rows = [(f"loader alone: decode + resize, {args.workers} workers (img/s)", decode_ips,
             f"{args.n_train + args.n_test} JPEGs: {(args.n_train + args.n_test) / decode_ips:.1f}s")]
    s = tracin(data, ckpts, work / "e2e", device.type, bs=args.batch_size, workers=args.workers, top_k=args.top_k)
    pairs = args.n_train * args.n_test
    rows.append(("efficient_tracin end to end: factors (img x ckpt / s)", (args.n_train + args.n_test) * len(ckpts) / s["seconds_factors"],
                 f"decode + {len(ckpts)} ckpts: {s['seconds_factors']:.1f}s"))
    rows.append(("efficient_tracin end to end: scores (Mpairs/s)", pairs / s["seconds_scores"] / 1e6,
                 f"{pairs:,} pairs: {s['seconds_scores']:.1f}s"))
    return rows, s


def main():
    args = parse_args()
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.n_train, args.n_test, args.checkpoints, args.batch_size, args.image_size, args.steps, args.top_k = 120, 40, 2, 8, 64, 2, 5
        args.workers = min(args.workers, 2)
    elif device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run with --smoke (tiny sizes) or --device cpu")
    torch.backends.cudnn.benchmark = True
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else (lambda: torch.autocast("cpu", enabled=False))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    t_all = time.time()
    try:
        t0 = time.time()
        data, ckpts = work / "data", []
        agree = device.type == "cuda" or args.smoke
        if agree or not args.skip_e2e:
            make_image_tree(data, args.n_train, args.n_test, args.workers)
            ckpts = make_checkpoints(work / "ckpt", args.checkpoints, args.image_size)
            print(f"set-up: {args.n_train + args.n_test} JPEGs and {len(ckpts)} checkpoints written in {time.time() - t0:.1f}s", flush=True)

        agreement, ok = {}, True
        if agree:
            agreement, ok = part0_agreement(work, data, ckpts, device, args)
            print(f"part 0 done ({time.time() - t_all:.0f}s)", flush=True)
        rows = [part1_training(device, args, amp)]
        rows += part2_factor_pass(device, args, amp)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(part3_scoring(device, args))
        print(f"parts 1-3 done ({time.time() - t_all:.0f}s)", flush=True)
        e2e = None
        if not args.skip_e2e:
            e2e_rows, e2e = part4_end_to_end(work, data, ckpts, device, args)
            rows += e2e_rows
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nBenchmark on {name} ({os.cpu_count()} CPU cores); ResNet50 at {args.image_size} px, batch {args.batch_size}, "
          f"{args.checkpoints} checkpoints, top-{args.top_k}, torch {torch.__version__}")
    what = "GPU vs CPU" if device.type == "cuda" else "CPU vs CPU (smoke: plumbing only)"
    if agreement:
        print(f"part 0, {what}, {min(args.n_train, 256)} train x {min(args.n_test, 32)} test, 2 ckpts, TF32 off: "
              + ", ".join(f"{k} {v:.2e}" if "diff" in k else f"{k} {v:.3f}" for k, v in agreement.items())
              + (" -> agree" if ok else " -> DISAGREE"))
    print(f"| {'measurement':<60} | {'rate':>10} | {'time':<40} |")
    print(f"|{'-' * 62}|{'-' * 12}|{'-' * 42}|")
    for label, rate, proj in rows:
        print(f"| {label:<60} | {rate:10.1f} | {proj:<40} |")
    if e2e is not None:
        print(f"full TracIn, measured end to end ({args.n_train} x {args.n_test}, {args.checkpoints} ckpts, top-{args.top_k} "
              f"both ways + self-influence, outputs written): {e2e['seconds_total']:.1f}s")
    print(json.dumps({"device": name, "agreement": agreement, "agree": ok, "rows": rows,
                      "e2e_seconds_total": None if e2e is None else e2e["seconds_total"],
                      "bench_seconds": time.time() - t_all}))
    if not ok:
        raise SystemExit("error: GPU and CPU results disagree beyond float32 round-off")


if __name__ == "__main__":
    main()
