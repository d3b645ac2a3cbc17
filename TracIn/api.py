"""The notebook API: a finished run as one object whose answers are DataFrames with paths and class names.

    import TracIn
    run = TracIn.open("TracIn/results")             # checks the data (and, for explain, the checkpoints) unchanged
    run.proponents(100, k=10)                       # the stored list: rank, train_idx, path, class, score
    run.opponents(100, k=10)
    run.self_influence()                            # train_idx, path, class, self_influence (TracIn's sum_t lr_t |g_t|^2)
    run.mislabel_candidates().head(50)              # mislabel_detection's ranking (refused when stale)
    run.test_table()                                # test_idx, path, label, prediction, margin
    run.lds()                                       # method, lds, ci_low, ci_high, damping (python -m TracIn.lds)
    run.explain(["photo.jpg", pil_image, array], k=10)  # new images (path, PIL image or HxWx3 uint8 array)

A Results holds the one loaded results folder and, opened on first use, the one run.InfluenceRun behind it (`run`);
the lists, tables and self-influence are the stored ones, `explain` recomputes. `explain` scores images that need not
be in the data set with the run's own method (--score_fn, --normalize,
--damping) against the cached training factors: per checkpoint one forward/backward of the query images and a pass
over the cached training rows, no forward pass of a training image. An image is explained under its label in the data
set when its file is one of the prepared splits, under a label you give, or else under the model's prediction
(column label_source says which). python -m TracIn.explain is its command line.

Every public method checks its arguments before any work (integers in range, never a float truncated; label names or
indices; images as paths, PIL images or HxWx3 uint8 arrays) and refuses a bad one with lib.cli.UserError, the project's
one-line error.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from lib.cli import UserError, checked_int, int_text
from lib.data_utils import eval_transform, list_split, load_rgb, to_rgb
from lib.files import read_json
from lib.prediction import logit_figures
from TracIn.core.results import explained_model, run_id
from TracIn.core.run import InfluenceRun, open_results

if TYPE_CHECKING:
    from PIL import Image

QUERY_BATCH = 64  # query images per forward pass and score block


# ---------------------------------------------------------------- argument checks of every public entry
def folder_arg(value, what: str, optional: bool = False):
    """A folder argument: a str or os.PathLike (None where optional)."""
    if value is None and optional:
        return None
    if isinstance(value, (str, os.PathLike)) and str(value):
        return value
    raise UserError(f"{what} must be a folder path, not {str(value)[:40]!r} ({type(value).__name__})")


def is_image(value) -> bool:
    """One image as the API takes it: a path, a PIL image or an HxWx3 uint8 array."""
    from PIL import Image

    return isinstance(value, (str, os.PathLike, Image.Image)) or (isinstance(value, np.ndarray) and value.ndim == 3)


def images_arg(images) -> list:
    """One image or a sequence of them, each a path, a PIL image or an HxWx3 uint8 array (RGB)."""
    if is_image(images):
        images = [images]
    elif isinstance(images, (bytes, dict)) or not hasattr(images, "__iter__"):
        raise UserError(f"images must be a path, a PIL image, an HxWx3 uint8 array or a list of them, not "
                        f"{type(images).__name__}")
    images = list(images)
    if not images:
        raise UserError("no images to explain")
    for i, im in enumerate(images):
        if not is_image(im):
            raise UserError(f"image {i} is a {type(im).__name__}: pass a path, a PIL image or an HxWx3 uint8 array")
        if isinstance(im, np.ndarray) and (im.shape[2] != 3 or im.dtype != np.uint8 or 0 in im.shape):
            raise UserError(f"image {i} is an array of shape {im.shape} and dtype {im.dtype}: pass HxWx3 uint8 (RGB)")
    return images


class Results:
    """A finished TracIn run (efficient_tracin's --output_dir) on its prepared data. data_dir: default the folder the run
    recorded; device for explain (default cpu)."""

    def __init__(self, results_dir="TracIn/results", data_dir=None, device: str = "cpu"):
        self.path = Path(folder_arg(results_dir, "results_dir"))
        data_dir = folder_arg(data_dir, "data_dir", optional=True)
        if not isinstance(device, str):
            raise UserError(f"device must be a string (auto, cpu or cuda[:N]), not {type(device).__name__}")
        self.results, self.data_dir = open_results(self.path, data_dir)  # refuses data changed since the run
        self.record, self.run_id, self.device = self.results.record, run_id(self.results.record), device
        self.train_list, self.test_list = list_split(self.data_dir, "train"), list_split(self.data_dir, "test")
        self.class_names = list(self.train_list.class_names)
        self._run = None

    def __repr__(self) -> str:
        return (f"<TracIn run {self.run_id} in {self.path}: {len(self.results['test_indices'])} test x "
                f"{len(self.results['train_indices'])} train, --score_fn {self.record['args']['score_fn']}, "
                f"top-{self.results['top_k_influences_indices'].shape[1]}, explaining {self.model}>")

    @property
    def model(self) -> str:
        """The model the lists, the test table and explain describe (train.py's selected model by default)."""
        return explained_model(self.record)

    @property
    def run(self) -> InfluenceRun:
        """The run.InfluenceRun behind it (checkpoints checked unchanged), opened on first use from the results and
        splits already loaded."""
        if self._run is None:
            self._run = InfluenceRun.from_results(self.path, self.data_dir, self.device, results=self.results,
                                                  splits=(self.train_list, self.test_list))
        return self._run

    # ------------------------------------------------------------------ the stored lists
    def _train_frame(self, idx: np.ndarray) -> pd.DataFrame:
        idx = np.asarray(idx, dtype=np.int64)
        return pd.DataFrame({"train_idx": idx, "path": np.asarray(self.train_list.paths)[idx],
                             "class": np.asarray(self.class_names)[self.train_list.labels[idx]]})

    def _list(self, kind: str, test_idx: int, k: int | None) -> pd.DataFrame:
        row = self.results.test_row(checked_int(test_idx, "test_idx", 0))
        values = np.asarray(self.results[f"top_k_{kind}_values"][row])
        indices = np.asarray(self.results[f"top_k_{kind}_indices"][row])
        k = len(values) if k is None else checked_int(k, "k", 1)
        if k > len(values):
            raise UserError(f"k={k}: the run kept the top {len(values)} (efficient_tracin.py --top_k)")
        frame = self._train_frame(indices[:k])
        frame.insert(0, "rank", np.arange(1, k + 1))
        frame["score"] = values[:k].astype(np.float64)
        return frame

    def proponents(self, test_idx: int, k: int | None = 10) -> pd.DataFrame:
        """The stored list: the k training images that most supported test image #test_idx's label (rank, train_idx,
        path, class, score), as the run wrote it (InfluenceRun.recompute_proponents recomputes)."""
        return self._list("influences", test_idx, k)

    def opponents(self, test_idx: int, k: int | None = 10) -> pd.DataFrame:
        """The stored list of the k training images that most opposed it, most negative first."""
        return self._list("opponents", test_idx, k)

    def self_influence(self) -> pd.DataFrame:
        """Per scored training image: TracIn's self-influence sum_t lr_t |g_t(z)|^2, in split order."""
        if "self_influence" not in self.results:
            raise UserError(f"{self.path} has no self_influence.npy (the run used --no_self_influence)")
        frame = self._train_frame(self.results["train_indices"])
        frame["self_influence"] = np.asarray(self.results["self_influence"], dtype=np.float64)
        return frame

    def test_table(self) -> pd.DataFrame:
        """Per scored test image: path, label, the explained model's prediction and margin (label logit minus the
        largest other; negative when mispredicted), from the run's cached logits; `self.model` says which model."""
        ids = np.asarray(self.results["test_indices"])
        logits = self.run.factors().test_logits[self.run.last_steps()].mean(0)[ids]  # (n, C): the last checkpoint('s mean)
        labels = self.test_list.labels[ids]
        _, margin, _ = logit_figures(logits[None], labels)
        names = np.asarray(self.class_names)
        return pd.DataFrame({"test_idx": ids, "path": np.asarray(self.test_list.paths)[ids], "label": names[labels],
                             "prediction": names[np.asarray(self.results["test_pred"])], "margin": margin[0].astype(np.float64)})

    # ------------------------------------------------------------------ the tools' outputs
    def mislabel_candidates(self) -> pd.DataFrame:
        """python -m TracIn.mislabel_detection's ranking of likely label errors (best first); refused if it was computed
        from another TracIn run (mislabel_detection.load)."""
        from TracIn import mislabel_detection

        return mislabel_detection.load(self.results).candidates

    def lds(self) -> pd.DataFrame:
        """python -m TracIn.lds's table: per method the linear datamodeling score, its 95% interval and damping
        (lds.load: refused if computed from another TracIn run)."""
        from TracIn import lds

        rows = [{"method": name, "lds": m["lds"], "ci_low": m["ci95"][0], "ci_high": m["ci95"][1], "damping": m.get("damping")}
                for name, m in lds.load(self.results)["methods"].items()]
        return pd.DataFrame(rows).sort_values("lds", ascending=False, ignore_index=True)

    # ------------------------------------------------------------------ new images
    def prepared_image(self, image) -> "Image.Image":
        """A path, PIL image or HxWx3 uint8 array (RGB) as the prepared splits hold it: RGB, image_size x image_size
        (prepare_data.py's bicubic resize and, for a JPEG split, its quality-95 encoding, when the size differs)."""
        from PIL import Image

        image = images_arg([image])[0]
        if isinstance(image, np.ndarray):
            im = Image.fromarray(np.ascontiguousarray(image), "RGB")
        elif isinstance(image, Image.Image):
            im = to_rgb(image)
        else:
            try:
                im = load_rgb(image)
            except ValueError as e:
                raise UserError(str(e)) from None
        prep = read_json(Path(self.data_dir) / "prepare_args.json") if (Path(self.data_dir) / "prepare_args.json").exists() else {}
        size = int(prep.get("image_size") or self.run.ckpts[0]["image_size"])
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
            if prep.get("format") == "jpg":
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=95)
                im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        return im

    def _labels(self, images, labels) -> tuple[list, list]:
        """Per image: the label index it is explained under, or None (its prediction), and where it came from."""
        if labels is not None:
            if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
                raise UserError(f"labels must be a list with one class name or index per image, not {str(labels)[:40]!r}")
            if len(labels) != len(images):
                raise UserError(f"{len(labels)} labels for {len(images)} images")
            return [self.label_index(lab) for lab in labels], ["given"] * len(images)
        known = {os.path.realpath(p): int(l) for listing in (self.train_list, self.test_list)
                 for p, l in zip(listing.paths, listing.labels)}
        found = [known.get(os.path.realpath(im)) if isinstance(im, (str, os.PathLike)) else None for im in images]
        return found, ["data set" if f is not None else "prediction" for f in found]

    def label_index(self, label) -> int:
        """A class given by name (a class of the run) or by index (an integer, or its digits as text, 0..C-1)."""
        if isinstance(label, str):
            if label in self.class_names:
                return self.class_names.index(label)
            try:
                label = int_text(label)
            except ValueError:
                raise UserError(f"label {label[:40]!r} is not a class of the run ({', '.join(self.class_names)}) or a "
                                f"class index 0..{len(self.class_names) - 1}") from None
        return checked_int(label, "label", 0, len(self.class_names) - 1)

    def explain(self, images, k: int = 10, labels=None) -> pd.DataFrame:
        """Proponents and opponents of images, scored by the run's method against the cached training factors.

        Args:
            images: one image or a list; each a path, a PIL image (any mode) or an HxWx3 uint8 RGB array.
            k: proponents and opponents per image (1..the scored training images).
            labels: None, or one class name or index per image to explain it under.
        Returns one row per (image, kind, rank): query, image, label, label_source, prediction, kind, rank, train_idx,
        path, class, score."""
        images = images_arg(images)
        k = checked_int(k, "k", 1, len(self.results["train_indices"]))
        run = self.run
        run.factors()  # the training side (a sharded run refused) before any image is read
        transform = eval_transform(run.ckpts[0])
        given, sources = self._labels(images, labels)
        names, frames = np.asarray(self.class_names), []
        for b0 in range(0, len(images), QUERY_BATCH):
            batch = images[b0:b0 + QUERY_BATCH]
            x = torch.stack([transform(self.prepared_image(im)) for im in batch])
            known = given[b0:b0 + QUERY_BATCH]
            # an image without a label is explained under its prediction, which costs one more forward pass first
            pred = run.predict(x).argmax(1) if any(g is None for g in known) else None
            y = np.array([p if g is None else g for g, p in zip(known, pred if pred is not None else known)], dtype=np.int64)
            tracker, view = run.query(x, y, k)
            if pred is None:  # the last checkpoint's logits came with the factors
                pred = view.logits()[run.last_steps()].mean(0).argmax(1)
            for kind, (values, indices) in (("proponent", tracker.proponents()), ("opponent", tracker.opponents())):
                values, indices = values.cpu().numpy(), indices.cpu().numpy()
                for i in range(len(batch)):
                    frame = self._train_frame(indices[i])
                    frame.insert(0, "rank", np.arange(1, k + 1))
                    frame["score"] = values[i].astype(np.float64)
                    q = b0 + i
                    head = {"query": q, "image": str(batch[i]) if isinstance(batch[i], (str, os.PathLike)) else f"<image {q}>",
                            "label": names[y[i]], "label_source": sources[q], "prediction": names[pred[i]], "kind": kind}
                    for j, (col, value) in enumerate(head.items()):
                        frame.insert(j, col, value)
                    frames.append(frame)
        return pd.concat(frames, ignore_index=True).sort_values(["query", "kind", "rank"], ascending=[True, False, True],
                                                                  ignore_index=True)

