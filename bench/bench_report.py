"""The results browser at full Animals-10 scale: a synthetic results folder of 21,000 training x 5,000
test images with top-100 proponents and opponents, a mislabel table and mispredictions.

    $ python -m bench.bench_report            # about 3 min on 2 cores (image files and thumbnails included)

Prints a table: report build time with thumbnails made and with thumbnails kept (what a rebuild
costs), report size on disk, and the time to first render of the test view (a test image with its
lists) in headless Chromium from file://, cold and warm. Work folder: bench/results/report/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from lib.files import save_json
from TracIn import report
from TracIn.core.results import run_id, write_run
from TracIn.core.run_folder import tool_folder

ROOT = Path("bench/results/report")
CLASSES = ["cane", "cavallo", "elefante", "farfalla", "gallina", "gatto", "mucca", "pecora", "ragno", "scoiattolo"]


def make_images(data: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Small distinct JPEGs in data/<split>/<class>/ (made once), sized like a thumbnail source."""
    from PIL import Image

    if (data / "done").exists():
        return
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = CLASSES[i % len(CLASSES)]
            (data / split / c).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((160, 120)).save(data / split / c / f"img_{i:06d}.jpg", quality=80)
    (data / "done").write_text("")


def make_results(res: Path, data: Path, k: int, seed: int = 1) -> None:
    from lib.data_utils import list_split

    tr, te = list_split(data, "train"), list_split(data, "test")
    n_train, n_test = len(tr.paths), len(te.paths)
    rng = np.random.default_rng(seed)
    heavy = rng.pareto(1.5, n_train)  # a few training images dominate many lists, as raw TracIn does
    prop_i = np.stack([rng.choice(n_train, k, replace=False, p=heavy / heavy.sum()) for _ in range(n_test)])
    opp_i = np.stack([rng.choice(n_train, k, replace=False) for _ in range(n_test)])
    prop_v = -np.sort(-rng.gamma(2.0, 1.0, (n_test, k)), axis=1).astype(np.float32)
    opp_v = np.sort(-rng.gamma(2.0, 1.0, (n_test, k)), axis=1).astype(np.float32)
    test_pred = np.where(rng.random(n_test) < 0.9, te.labels, rng.integers(0, 10, n_test))
    arrays = {"top_k_influences_values": prop_v, "top_k_influences_indices": prop_i, "top_k_opponents_values": opp_v,
              "top_k_opponents_indices": opp_i, "test_indices": np.arange(n_test), "train_indices": np.arange(n_train),
              "test_pred": test_pred, "self_influence": rng.gamma(1.0, 1.0, n_train).astype(np.float32),
              "train_loss_last": rng.gamma(1.0, 0.3, n_train).astype(np.float32),
              "train_pred_last": np.where(rng.random(n_train) < 0.95, tr.labels, rng.integers(0, 10, n_train))}
    record = {"args": {"normalize": "none"}, "identity": {"checkpoint_sha256": ["synthetic"]}, "layers": ["fc"],
              "data": {"data_dir": str(data.resolve()), "n_train_split": n_train, "n_test_split": n_test, "class_names": CLASSES},
              "checkpoints": [{"path": "synthetic.pth", "sha256": "synthetic", "epoch": 1, "lr": 1e-4}],
              "summary": {"n_train": n_train, "n_test": n_test, "n_checkpoints": 1, "seconds_total": 0.0}}
    res.mkdir(parents=True, exist_ok=True)
    write_run(res, arrays, {}, record)
    score = rng.random(n_train)
    order = np.argsort(-score)
    candidates = pd.DataFrame({"rank": np.arange(1, n_train + 1), "train_idx": order, "path": np.asarray(tr.paths)[order],
                               "given_class": np.asarray(CLASSES)[tr.labels[order]],
                               "predicted_class": np.asarray(CLASSES)[arrays["train_pred_last"][order]],
                               "ensemble": score[order], "aum": rng.normal(size=n_train), "loss_last": arrays["train_loss_last"][order],
                               "self_influence": arrays["self_influence"][order]})
    with tool_folder(res / "mislabel", "mislabel_detection", {"tracin_run": run_id(record)}) as build:  # as the tool writes it
        candidates.to_csv(build / "mislabel_candidates.csv", index=False)
        save_json(build / "mislabel_detection.json", {"tracin_run": run_id(record), "score": "ensemble",
                                                      "detectors": ["ensemble", "aum", "loss_last", "self_influence"]})
    wrong = np.flatnonzero(test_pred != te.labels)
    fp = ROOT / "false_predictions"
    fp.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"split": "test", "index": wrong, "path": np.asarray(te.paths)[wrong], "true_label": np.asarray(CLASSES)[te.labels[wrong]],
                  "pred_label": np.asarray(CLASSES)[test_pred[wrong]], "confidence": 0.6, "true_class_prob": 0.2}).to_csv(fp / "false_predictions.csv", index=False)


def first_render(url: str, test_idx: int, n: int) -> list[float]:
    """Seconds from navigation to the test view showing test_idx with its lists, n times (first cold)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    o = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900"):
        o.add_argument(a)
    o.binary_location = shutil.which("chromium")
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=o)
    times = []
    try:
        for _ in range(n):
            d.get("about:blank")
            t0 = time.time()
            d.get(f"{url}#test/{test_idx}")
            while not d.execute_script("return document.querySelectorAll('.list .thumb').length >= 20"):
                if time.time() - t0 > 60:
                    raise SystemExit(f"test view of #{test_idx} did not render in 60 s")
                time.sleep(0.01)
            times.append(time.time() - t0)
    finally:
        d.quit()
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_train", type=int, default=21000, help="training images (default 21000)")
    p.add_argument("--n_test", type=int, default=5000, help="test images (default 5000)")
    p.add_argument("--k", type=int, default=100, help="top-k of the synthetic run (default 100)")
    args = p.parse_args()
    data, res = ROOT / "data", ROOT / "results"
    t0 = time.time()
    make_images(data, args.n_train, args.n_test)
    t_images = time.time() - t0
    make_results(res, data, args.k)
    shutil.rmtree(res / "report", ignore_errors=True)
    argv = ["--results_dir", str(res), "--data_dir", str(data), "--false_predictions", str(ROOT / "false_predictions"),
            "--eval_dir", str(ROOT / "none")]
    first = report.build(report.parse_args(argv))
    again = report.build(report.parse_args(argv))
    url = (res / "report" / "index.html").resolve().as_uri()
    render = first_render(url, min(4123, args.n_test - 1), 4)
    du = sum(f.stat().st_blocks * 512 for f in (res / "report").rglob("*") if f.is_file())
    data_bytes = sum(f.stat().st_size for f in (res / "report" / "data").rglob("*") if f.is_file())
    print(f"\nresults browser at {args.n_train:,} train x {args.n_test:,} test, top-{args.k} both ways "
          f"(synthetic images made in {t_images:.0f}s, not counted)")
    print("| measure | value |\n|---|---:|")
    for name, value in (("build, thumbnails made", f"{first['seconds']:.1f} s ({first['thumbnails_made']:,} thumbnails, {first['seconds_thumbnails']:.1f} s of it)"),
                        ("build, thumbnails kept (rebuild)", f"{again['seconds']:.1f} s ({again['thumbnails_kept']:,} kept)"),
                        ("report on disk (du)", f"{du / 2**20:.0f} MiB ({first['bytes'] / 2**20:.0f} MiB of file content)"),
                        ("data files (JS chunks)", f"{data_bytes / 2**20:.1f} MiB"),
                        ("test images / training images in the report", f"{first['test_images']:,} / {first['training_images']:,}"),
                        ("first render of #test/<i>, cold", f"{render[0]:.2f} s"),
                        ("first render of #test/<i>, warm (median of 3)", f"{np.median(render[1:]):.2f} s")):
        print(f"| {name} | {value} |")
    (ROOT / "bench_report.json").write_text(json.dumps({"first": first, "again": again, "render_s": render, "du_bytes": du}, indent=2, default=str))


if __name__ == "__main__":
    main()
