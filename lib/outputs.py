"""The readers of the model-side scripts' outputs (evaluate.py, false_prediction.py, gradCAM_evaluation.py): each checks
what it reads against the data as prepared now and, given a TracIn run, the model that run explains.

    from lib.outputs import load_evaluation, load_false_predictions, load_gradcam
    fp = load_false_predictions("false_predictions", "data/processed", results)   # refused with one line when stale
    cams = load_gradcam(fp, notes)                                                  # or None, with a line in notes

Each script exports its reader as `load` (evaluate.load, false_prediction.load, gradCAM_evaluation.load); the report,
the notebook API and the demo's closing report read through these. With notes=None a reader refuses with one
UserError line; given a list, it notes the line there and returns None.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lib.checkpoints import model_difference
from lib.cli import UserError, skip
from lib.data_utils import data_identity, read_false_predictions
from lib.files import identity_mismatch, read_json


@dataclass
class Evaluation:
    """This tool's output for one split: metrics_<split>.json (accuracy, loss, n, model, model_record, selected_on,
    selection_accuracy, per_class_accuracy) and the confusion-matrix figure (None when absent)."""

    metrics: dict
    figure: Path | None


def load_evaluation(eval_dir, data_dir, results=None, split: str = "test", notes: list[str] | None = None) -> Evaluation | None:
    """The evaluation in `eval_dir`, checked against `data_dir` as prepared now and, with `results` (a TracInResults),
    the model that run explains. Missing, of other data or of another model: one UserError line, or with
    `notes` a line there and None; unreadable: refused."""
    path = Path(eval_dir) / f"metrics_{split}.json"
    if not path.exists():
        return skip(f"no {path}: run python evaluate.py --split {split}", notes)
    metrics = read_json(path, "rerun python evaluate.py")
    if identity_mismatch(metrics, data_identity(data_dir, images=False)):
        return skip(f"{path} skipped: computed on other data (rerun evaluate.py)", notes)
    other = model_difference(results.record.get("model"), metrics.get("model_record")) if results is not None else None
    if other:
        return skip(f"{path} skipped: the TracIn lists and the evaluation: {other}; rerun evaluate.py and "
                    "efficient_tracin.py on the selected model (their defaults)", notes)
    figure = Path(eval_dir) / f"confusion_matrix_{split}.png"
    return Evaluation(metrics, figure if figure.is_file() else None)


@dataclass
class FalsePredictions:
    """This tool's output: the mispredictions table (read_false_predictions' columns), its record (model, data) and
    the grid figure (None when absent)."""

    folder: Path
    table: pd.DataFrame
    record: dict
    figure: Path | None


def load_false_predictions(where, data_dir, results=None, notes: list[str] | None = None) -> FalsePredictions | None:
    """The mispredictions table in `where` (the folder or its false_predictions.csv), checked against `data_dir` as
    prepared now and, with `results` (a TracInResults), the model that run explains. Missing, of other data or of
    another model: one UserError line, or with `notes` a line there and None."""
    folder = Path(where).parent if Path(where).suffix == ".csv" else Path(where)
    csv = folder / "false_predictions.csv"
    if not csv.exists():
        return skip(f"no mispredictions table ({csv}; python false_prediction.py)", notes)
    try:
        table, record = read_false_predictions(csv, data_dir, images=False)
    except UserError as e:
        return skip(f"mispredictions skipped: {e}", notes)
    other = model_difference(results.record.get("model"), record.get("model")) if results is not None else None
    if other:
        return skip(f"mispredictions skipped: the TracIn lists and {csv}: {other}; rerun false_prediction.py and "
                    "efficient_tracin.py on the selected model (their defaults)", notes)
    figure = folder / "combined_mispredictions.png"
    return FalsePredictions(folder, table, record, figure if figure.is_file() else None)


@dataclass
class GradcamMaps:
    """This tool's maps of mispredicted test images (gradcam/test_<idx>.png) and their grid."""

    folder: Path
    figure: Path | None

    def map(self, test_idx: int) -> Path | None:
        """Test image #test_idx's map, None when it has none."""
        path = self.folder / f"test_{int(test_idx)}.png"
        return path if path.is_file() else None


def load_gradcam(false_predictions, notes: list[str] | None = None) -> GradcamMaps | None:
    """The maps beside a loaded mispredictions table (load_false_predictions), when made with its model and data.
    Missing or of another model or data: one UserError line, or with `notes` a line there and None; unreadable:
    refused."""
    folder = false_predictions.folder / "gradcam"
    if not (folder / "identity.json").is_file():
        return skip(f"no Grad-CAM maps (python gradCAM_evaluation.py writes {folder}/)", notes)
    ident = read_json(folder / "identity.json", "rerun python gradCAM_evaluation.py")
    if any(ident.get(k) != false_predictions.record.get(k) for k in ("model_sha256", "data_dir", "manifest_key")):
        return skip(f"Grad-CAM maps in {folder} skipped: made with another model or data than the mispredictions table "
                    "(rerun python gradCAM_evaluation.py)", notes)
    figure = false_predictions.folder / "gradcam_mispredictions.png"
    return GradcamMaps(folder, figure if figure.is_file() else None)
