"""Multi-layer TracIn on two embedded real data sets: cost and quality per layer set, and per --proj_dim.

    $ python -m bench.bench_multilayer                       # about 40 min on 2 cores
    $ python -m bench.bench_multilayer --sets digits         # a quicker look

Each cell is the demo's run (ResNet50 from scratch, 4 epochs, 32 px, 10% uniform label noise; the
bench_mislabel cell, made if missing) scored by efficient_tracin.py with one layer set into its own
folder bench/results/multilayer/<cell>/ (fresh factors, so the factor pass is timed), then:
- cost: factor-pass seconds (every checkpoint's forward pass plus the backward through the target
  layers), scoring seconds, factor cache size;
- mislabel detection by TracIn's self-influence and its per-checkpoint rank variant (ROC AUC,
  recall@10%) against the injected noise;
- the counterfactual check with --retrain head (k = 40 proponents of 10 test images, 3 seeds): the
  group's loss change for raw and normalised TracIn lists beside same-class random removals. Only fc
  is retrained there, so it cannot see what the backbone layers' lists add; a full retrain per cell
  would take hours on 2 cores.
A cell keeps its outputs; a rerun skips finished cells.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

from bench.bench_mislabel import ROOT as MISLABEL_ROOT, run_cell
from TracIn import counterfactual_check, mislabel_detection
from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job

ROOT = Path("bench/results/multilayer")
LAYER_SETS = {"fc": ["fc"], "layer4.2+fc": ["layer4.2", "fc"], "layer4+fc": ["layer4", "fc"],
              "layer3+layer4+fc": ["layer3", "layer4", "fc"]}


def cell(demo_set: str, name: str, layers: list[str], proj_dim: int) -> dict:
    out = ROOT / f"{demo_set}-{name}-r{proj_dim}"
    done = out / "cell.json"
    if done.exists():
        return json.loads(done.read_text())
    src = f"{demo_set}-uniform-10-resnet50-e4"
    run_cell(src, demo_set, "uniform", 0.1, argparse.Namespace(arch="resnet50", epochs=4))
    data, ckpt = MISLABEL_ROOT / src / "data", MISLABEL_ROOT / src / "ckpt"
    shutil.rmtree(out, ignore_errors=True)
    tracin_job(TracInConfig(data_dir=str(data), checkpoint_dir=str(ckpt), output_dir=str(out), top_k=40, batch_size=64,
                            layers=list(layers), proj_dim=int(proj_dim)))
    summary = json.loads((out / "run.json").read_text())["summary"]
    cache = sum(f.stat().st_size for f in (out / "factors").rglob("*.npy"))
    assert mislabel_detection.main(["--results_dir", str(out), "--data_dir", str(data), "--checkpoint_dir", str(ckpt)]) == 0
    det = json.loads((out / "mislabel" / "mislabel_detection.json").read_text())["metrics"]
    assert counterfactual_check.main(["--results_dir", str(out), "--data_dir", str(data), "--retrain", "head", "--k", "40",
                                      "--n_test", "10", "--seeds", "3", "--methods", "tracin", "tracin_normalized", "random"]) == 0
    cf = json.loads((out / "counterfactual" / "head" / "counterfactual.json").read_text())["summary"]
    result = {"seconds_factors": summary["seconds_factors"], "seconds_scores": summary["seconds_scores"], "cache_bytes": cache,
              "n_layers": len(json.loads((out / "run.json").read_text())["layers"]),
              "self_influence": det["self_influence"], "self_influence_rank": det["self_influence_rank"],
              "counterfactual": {m: cf[f"{m}@40"] for m in ("tracin", "tracin_normalized", "random")}}
    shutil.rmtree(out / "factors")  # hundreds of MB per cell; the figures above are what the table needs
    done.write_text(json.dumps(result, indent=2))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "digits"], help="demo sets (default mnist digits)")
    p.add_argument("--proj_dims", nargs="+", type=int, default=[8, 16, 32], help="R for layer4+fc (default 8 16 32)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    rows = []
    for demo_set in args.sets:
        for name, layers in LAYER_SETS.items():
            rows.append((demo_set, name, 16, cell(demo_set, name, layers, 16)))
            print(f"done: {demo_set} {name} R=16", flush=True)
        for r in args.proj_dims:
            if r != 16:
                rows.append((demo_set, "layer4+fc", r, cell(demo_set, "layer4+fc", LAYER_SETS["layer4+fc"], r)))
                print(f"done: {demo_set} layer4+fc R={r}", flush=True)
    print("\nMulti-layer TracIn (ResNet50, 4 checkpoints, 32 px, 10% uniform noise; R = --proj_dim; "
          "counterfactual: head retrain, k=40, mean +- std of the group's loss change over 3 seeds)")
    print("| data | layers | R | conv layers | factor pass | scoring | cache | self-influence AUC / recall@10% | "
          "self_influence_rank AUC / recall@10% | removal: raw TracIn | normalised | random |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|---|---|---|")
    for demo_set, name, r, c in rows:
        si, sr, cf = c["self_influence"], c["self_influence_rank"], c["counterfactual"]
        fmt = lambda m: f"{cf[m]['d_loss_mean']:+.3f} +- {cf[m]['d_loss_std']:.3f}" + (" **beats**" if cf[m].get("beats_random") else "")
        print(f"| {demo_set} | {name} | {r if name != 'fc' else '-'} | {c['n_layers'] - 1} | {c['seconds_factors']:.0f} s | "
              f"{c['seconds_scores']:.0f} s | {c['cache_bytes'] / 2**20:.0f} MiB | {si['roc_auc']:.3f} / {si['recall_at_10pct']:.3f} | "
              f"{sr['roc_auc']:.3f} / {sr['recall_at_10pct']:.3f} | {fmt('tracin')} | {fmt('tracin_normalized')} | {fmt('random')} |")


if __name__ == "__main__":
    main()
