"""The one owner of TracIn's results files: their names, writing them as one run, loading them checked.

    from TracIn.results import load_results
    r = load_results("TracIn/results", data_dir="data/processed")   # refuses results of other data
    row = r.test_row(100)                       # row of test image #100 in the [n_test, k] arrays
    r.arrays["top_k_influences_indices"][row]   # its proponents (split indices of the train split)

Writing (`write_run`): every file goes to a staging folder first; then the old record
(run.json) is removed, the new files replace the old ones, files this run did not write
(and analysis outputs derived from the previous run) are removed, and the record is moved in
last. So a results folder holds one complete run or no record at all, and a run that fails
before the swap leaves the previous results exactly as they were.

Loading (`load_results`): refuses a folder without a record, and results computed on another
data folder, with other split sizes or class names, naming the flag that fixes it.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import UserError, save_csv, save_json, save_npy

RECORD = "run.json"
# Arrays of one run: [n_test, k] top-k lists, row/column index maps, per-image figures.
ARRAYS = (
    "top_k_influences_values", "top_k_influences_indices",   # proponents, descending
    "top_k_opponents_values", "top_k_opponents_indices",     # opponents, most negative first
    "test_indices", "train_indices",                         # split indices of the rows / of the train arrays
    "test_pred",                                             # last checkpoint's prediction per test row
    "self_influence",                                        # [n_train] sum_t lr_t |g_t|^2 (optional)
    "train_loss_last", "train_pred_last",                    # [n_train] last checkpoint's loss / prediction
    "train_loss_per_ckpt", "train_margin_per_ckpt",          # [n_ckpt, n_train] loss, logit margin per checkpoint
    "train_el2n_per_ckpt",                                   # [n_ckpt, n_train] |softmax - onehot| per checkpoint
    "train_grad_sq_norm_per_ckpt",                           # [n_ckpt, n_train] |g_t|^2 (self_influence = lr @ this)
)
REQUIRED = ARRAYS[:7]
TABLES = ("top_k_influences.csv",)
# Outputs of the analysis scripts computed from a run; removed when a new run lands.
DERIVED = ("mislabel_candidates.csv", "mislabel_detection.json", "mislabel_detection.png",
           "misprediction_influence_analysis.csv", "misprediction_cross_analysis.csv", "misprediction_summary.json",
           "analysis", "gradcam_test_*_proponents.png", "clean_and_retrain",
           "counterfactual", "raw", "normalized", "report")


def write_run(out: Path, arrays: dict, tables: dict, record: dict) -> None:
    """Write one run's arrays (name -> ndarray or None), tables (file name -> DataFrame) and record."""
    unknown = [n for n in arrays if n not in ARRAYS] + [n for n in tables if n not in TABLES]
    if unknown:
        raise ValueError(f"not a results file of TracIn/results.py: {unknown}")
    out = Path(out)
    staging = out / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        written = []
        for name, array in arrays.items():
            if array is not None:
                save_npy(staging / f"{name}.npy", np.asarray(array))
                written.append(f"{name}.npy")
        for name, frame in tables.items():
            save_csv(staging / name, frame)
            written.append(name)
        save_json(staging / RECORD, {**record, "files": sorted(written)})
        # The swap: no record while the files change, so a reader never mixes two runs.
        (out / RECORD).unlink(missing_ok=True)
        for name in [f"{a}.npy" for a in ARRAYS] + list(TABLES):
            if name in written:
                os.replace(staging / name, out / name)
            else:
                (out / name).unlink(missing_ok=True)
        for pattern in DERIVED:
            for path in out.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        os.replace(staging / RECORD, out / RECORD)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def index_of(ids: np.ndarray, wanted) -> np.ndarray:
    """Positions of `wanted` split indices in the array `ids` (any order); -1 where absent.

    The one mapping from split indices to rows of a results array (subsets make them differ).
    """
    ids = np.asarray(ids, dtype=np.int64)
    wanted = np.atleast_1d(np.asarray(wanted, dtype=np.int64))
    out = np.full(len(wanted), -1, dtype=np.int64)
    if len(ids) == 0:
        return out
    order = np.argsort(ids, kind="stable")
    pos = np.clip(np.searchsorted(ids[order], wanted), 0, len(ids) - 1)
    hit = ids[order][pos] == wanted
    out[hit] = order[pos[hit]]
    return out


@dataclass
class TracInResults:
    """A loaded run: `arrays` (memory-mapped .npy), `record` (run.json) and index helpers."""

    path: Path
    record: dict
    arrays: dict

    def __getitem__(self, name):
        return self.arrays[name]

    def __contains__(self, name) -> bool:
        return name in self.arrays

    def test_row(self, test_idx: int) -> int:
        row = int(index_of(self.arrays["test_indices"], test_idx)[0])
        if row < 0:
            raise UserError(f"test image #{test_idx} is not among the {len(self.arrays['test_indices'])} test images of {self.path}")
        return row

    def train_values(self, name: str, train_idx) -> np.ndarray:
        """A per-training-image array (e.g. self_influence) at split indices; NaN where not scored."""
        pos = index_of(self.arrays["train_indices"], train_idx)
        values = np.asarray(self.arrays[name], dtype=np.float64)
        return np.where(pos >= 0, values[np.maximum(pos, 0)], np.nan)


def load_results(results_dir, data_dir=None, need=()) -> TracInResults:
    """Load a complete run, checked against `data_dir` (its path, split sizes and class names).

    Args:
        results_dir: efficient_tracin.py's --output_dir.
        data_dir: the prepared data the caller will index with the results (None: no check).
        need: optional array names the caller needs (e.g. ("self_influence",)).
    """
    results_dir = Path(results_dir)
    record_path = results_dir / RECORD
    if not record_path.exists():
        raise UserError(f"{results_dir} holds no complete TracIn run (no {RECORD}); run TracIn/efficient_tracin.py "
                        f"--output_dir {results_dir} first")
    record = json.loads(record_path.read_text())
    files = set(record.get("files", []))
    missing = [n for n in list(REQUIRED) + list(need) if f"{n}.npy" not in files or not (results_dir / f"{n}.npy").exists()]
    if missing:
        hint = " (the run used --no_self_influence: rerun without it)" if "self_influence" in missing else ""
        raise UserError(f"{results_dir} lacks {', '.join(missing)}.npy{hint}; rerun TracIn/efficient_tracin.py")
    if data_dir is not None:
        check_data(record, data_dir, results_dir)
    arrays = {n: np.load(results_dir / f"{n}.npy", mmap_mode="r") for n in ARRAYS if f"{n}.npy" in files}
    return TracInResults(results_dir, record, arrays)


def check_data(record: dict, data_dir, results_dir) -> None:
    """Refuse to index results with a data folder other than the one they were computed on."""
    from data_utils import list_split

    data = record["data"]
    if Path(data_dir).resolve() != Path(data["data_dir"]):
        raise UserError(f"{results_dir} was computed on --data_dir {data['data_dir']}, not {data_dir}; "
                        f"pass --data_dir {data['data_dir']} (or rerun TracIn on this data)")
    for split in ("train", "test"):
        listing = list_split(data_dir, split)
        if len(listing.paths) != data[f"n_{split}_split"] or listing.class_names != data["class_names"]:
            raise UserError(f"{data_dir} changed since TracIn ran on it ({split}: {len(listing.paths)} images now, "
                            f"{data[f'n_{split}_split']} then); rerun TracIn/efficient_tracin.py")
