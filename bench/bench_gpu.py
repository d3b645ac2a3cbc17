"""GPU benchmark: training images/s and TracIn throughput at Animals-10 scale, with a projection.

    $ python3 -m bench.bench_gpu                 # on a GPU machine, from the repo root (no venv needed)
    $ python3 -m bench.bench_gpu --smoke         # tiny sizes on the CPU, to check the script runs

Random 224 px data on the device (JPEG decoding, done once per image, is not included).
Measures (1) ResNet50 training steps (bf16 autocast, channels_last, Adam), (2) the TracIn
factor pass (all checkpoints resident, every batch through every checkpoint) in fp32 and
bf16, (3) the scoring stage on random factors of the real size held on the GPU (exact
blocked scores, top-k proponents and opponents, self-influence), then projects the full run:
20,893 train x 5,224 test, 8 checkpoints, top-100. Sized to finish well under 8 minutes.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_train", type=int, default=20893, help="training images projected (default 20893)")
    p.add_argument("--n_test", type=int, default=5224, help="test images projected (default 5224)")
    p.add_argument("--checkpoints", type=int, default=8, help="checkpoints (default 8)")
    p.add_argument("--top_k", type=int, default=100, help="k (default 100)")
    p.add_argument("--batch_size", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--image_size", type=int, default=224, help="image size (default 224)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement (default 30)")
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


def main():
    from model_architecture import build_model
    from TracIn.efficient_tracin import ResidentFactors, score_topk
    from TracIn.influence_utils import InfluenceHook, self_influence

    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.n_train, args.n_test, args.checkpoints, args.batch_size, args.image_size, args.steps = 600, 200, 2, 8, 64, 2
    elif device.type != "cuda":
        raise SystemExit("error: no CUDA device; run with --smoke to check the script on the CPU")
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bs, size = args.batch_size, args.image_size
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,), device=device)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else (lambda: torch.autocast("cpu", enabled=False))
    rows = []

    # (1) training
    model = build_model("resnet50", 10).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def train_step():
        with amp():
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = timed(train_step, device, args.steps)
    train_ips = bs / s
    rows.append(("training step, bf16 + channels_last (img/s)", train_ips, f"epoch of {args.n_train}: {args.n_train / train_ips:.1f}s"))
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # (2) factor pass: every checkpoint resident, each batch through all of them
    models = [build_model("resnet50", 10).to(device).to(memory_format=torch.channels_last).eval() for _ in range(args.checkpoints)]
    hooks = [InfluenceHook(m, ["fc"]).__enter__() for m in models]
    factor_rate = {}
    for label, use_amp in (("fp32", False), ("bf16", True)):
        def factor_step():
            for h in hooks:
                with amp() if use_amp else torch.autocast(device.type, enabled=False):
                    f, _, _ = h.factors(x, y)
                f["fc"][0].float(), f["fc"][1].float()

        s = timed(factor_step, device, max(2, args.steps // 3))
        factor_rate[label] = bs * args.checkpoints / s  # image-checkpoint pairs per second
        total = (args.n_train + args.n_test) * args.checkpoints / factor_rate[label]
        rows.append((f"TracIn factor pass {label} (img x ckpt / s)", factor_rate[label], f"all images x {args.checkpoints} ckpts: {total:.1f}s"))
    for h in hooks:
        h.release()
    del models, hooks
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # (3) scoring at full size on random factors resident on the device
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
    t_score = time.time() - t0
    pairs = args.n_train * args.n_test
    rows.append(("scoring + top-k both ways + self-influence (Mpairs/s)", pairs / t_score / 1e6, f"{pairs:,} pairs: {t_score:.1f}s"))

    print(f"\nGPU benchmark on {name}; ResNet50 at {size} px, batch {bs}, {args.checkpoints} checkpoints, top-{args.top_k}")
    print(f"| {'measurement':<55} | {'rate':>10} | {'projection':<38} |")
    print(f"|{'-' * 57}|{'-' * 12}|{'-' * 40}|")
    for label, rate, proj in rows:
        print(f"| {label:<55} | {rate:10.1f} | {proj:<38} |")
    for label in ("fp32", "bf16"):
        total = (args.n_train + args.n_test) * args.checkpoints / factor_rate[label] + t_score
        print(f"projected full TracIn ({args.n_train} x {args.n_test}, {args.checkpoints} ckpts, factors {label}): {total:.1f}s "
              f"(+ decoding {args.n_train + args.n_test} JPEGs once)")


if __name__ == "__main__":
    main()
