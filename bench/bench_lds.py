"""Head LDS of every method on two embedded real data sets and two training settings: the table in docs/lds.md.

    $ python -m bench.bench_lds                   # about 20 min on 2 cores
    $ python -m bench.bench_lds --sets digits     # a quicker look

Cells: MNIST (the demo's 5,000 digits) and scikit-learn's 8x8 digits, 10% uniform label noise, each trained as
- resnet50-e4: the demo's run (ResNet50 from scratch, 4 epochs, 32 px, a checkpoint after each; bench_mislabel's cell),
- resnet18-e2: ResNet18, 2 epochs (a checkpoint after each), the counterfactual bench's full-retrain original.
For each cell, python -m TracIn.lds with its defaults: 200 random halves of the training set, fc retrained on the last
checkpoint's features for each, 200 seeded test images; the damping of the influence functions is chosen on the first
50 subsets and the LDS reported on the other 150 (95% bootstrap interval over test images). Records stay in
bench/results/lds/<cell>/, so a rerun only scores.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from bench.bench_counterfactual import resnet18_run
from bench.bench_mislabel import ROOT as MISLABEL_ROOT, run_cell
from TracIn import lds

ROOT = Path("bench/results/lds")


def cell_run(demo_set: str, setting: str) -> tuple[Path, Path]:
    """(results_dir, data_dir) of a cell's TracIn run, made if missing."""
    name = f"{demo_set}-uniform-10-resnet50-e4"
    run_cell(name, demo_set, "uniform", 0.1, argparse.Namespace(arch="resnet50", epochs=4))
    data = MISLABEL_ROOT / name / "data"
    if setting == "resnet50-e4":
        return MISLABEL_ROOT / name / "results", data
    out = ROOT / f"{demo_set}-{setting}-run"
    if not (out / "results" / "run.json").exists():
        resnet18_run(data, out, top_k=20)
    return out / "results", data


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=["mnist", "digits"], help="demo sets (default mnist digits)")
    p.add_argument("--settings", nargs="+", default=["resnet50-e4", "resnet18-e2"], help="training settings (default both)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")
    cells = {}
    for setting in args.settings:
        for demo_set in args.sets:
            results, data = cell_run(demo_set, setting)
            cells[f"{demo_set} {setting}"] = lds.evaluate(lds.parse_args(
                ["--results_dir", str(results), "--data_dir", str(data), "--out_dir", str(ROOT / f"{demo_set}-{setting}"),
                 "--methods", *lds.METHODS]))
            print(f"done: {demo_set} {setting} ({cells[f'{demo_set} {setting}']['seconds']:.0f}s)", flush=True)
    names = list(cells)
    print("\n| method | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for m in lds.METHODS:
        row = []
        for n in names:
            r = cells[n]["methods"].get(m)
            row.append("-" if r is None else f"{r['lds']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
                       + (f" (damping {r['damping']:g})" if r["damping"] is not None else ""))
        print(f"| {m} | " + " | ".join(row) + " |")
    print("| subset models' accuracy | " + " | ".join(f"{cells[n]['subset_model_accuracy']:.3f}" for n in names) + " |")
    print("| seconds (retrain + scores) | " + " | ".join(f"{cells[n]['seconds_retrain']:.0f} + {cells[n]['seconds_scores']:.0f}"
                                                        for n in names) + " |")
    for n in names:
        for m, r in cells[n]["methods"].items():
            if r["sweep"]:
                print(f"{n} {m} sweep (select/report): " + ", ".join(f"{float(k):g}: {v['select']:.3f}/{v['report']:.3f}"
                                                                     for k, v in r["sweep"].items()))
    Path(ROOT).mkdir(parents=True, exist_ok=True)
    (ROOT / "table.json").write_text(json.dumps({n: {m: {k: v for k, v in r.items() if k != "per_test"}
                                                     for m, r in c["methods"].items()} for n, c in cells.items()}, indent=2))


if __name__ == "__main__":
    main()
