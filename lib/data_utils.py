"""The one data module: class names, image decoding, split listing, transforms, loaders.

Every script and `TracIn/*` takes its images from here, so a training index means the
same image everywhere: the position in the sorted image-folder order of a split
(classes sorted by name, files sorted by name within a class; torchvision's ImageFolder
order), which is also the `index` column of `data/processed/manifest.csv`.

Why one module over 300 lines: it is the data's one definition (names, decoding, order, transforms, identity keys);
split, two modules could disagree on which image index i is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lib.cli import UserError, first_line
from lib.files import file_sha256

# Animals-10 ships Italian folder names; anything else is kept as it is.
ITALIAN_TO_ENGLISH = {
    "cane": "dog",
    "cavallo": "horse",
    "elefante": "elephant",
    "farfalla": "butterfly",
    "gallina": "chicken",
    "gatto": "cat",
    "mucca": "cow",
    "pecora": "sheep",
    "ragno": "spider",
    "scoiattolo": "squirrel",
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "test")

# A truncated JPEG must fail loudly, not decode as grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def english_class_name(folder: str) -> str:
    return ITALIAN_TO_ENGLISH.get(folder.lower(), folder)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode any image file to an 8-bit RGB PIL image, EXIF orientation applied.

    Handles grayscale, palette (with transparency), RGBA/LA (composited on white),
    CMYK and 16-bit/float modes. Raises ValueError for anything unreadable, and for an image beyond PIL's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS x 2 pixels, about 179 megapixels).
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit/float scaled, palette and alpha composited on white (load_rgb's modes)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max()
        arr = arr / (65535.0 if hi > 255 and im.mode.startswith("I;16") else max(hi, 1.0)) * 255.0
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


@dataclass(frozen=True)
class SplitListing:
    paths: list[str]
    labels: np.ndarray  # int64 (n,)
    class_names: list[str]


def list_split(data_dir: str | os.PathLike, split: str) -> SplitListing:
    """List `data_dir/split/<class>/<file>` in ImageFolder order."""
    root = Path(data_dir) / split
    if not root.is_dir():
        raise UserError(
            f"no '{split}' folder in {data_dir}: expected {root}/<class>/<image>; run prepare_data.py first"
        )
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise UserError(f"{root} has no class folders")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(f for f in os.listdir(root / name) if f.lower().endswith(IMAGE_EXTENSIONS))
        paths += [str(root / name / f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"{root} holds no images")
    return SplitListing(paths, np.asarray(labels, dtype=np.int64), class_names)


def listing_key(listing: SplitListing) -> str:
    """Content key of a split's image list: every file's path, label, size and mtime. Re-prepared, relabelled or
    edited data gets a new key, so a result computed on other data is recognised even at the same path and size."""
    import hashlib

    h = hashlib.sha256()
    for path, label in zip(listing.paths, listing.labels):
        st = os.stat(path)
        h.update(f"{path}\0{int(label)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def data_identity(data_dir, images: bool = True) -> dict:
    """What a result computed on `data_dir` records about it: the folder, the preparation (a hash of prepare_data.py's
    manifest.csv, None without one) and each split's content key. images=False leaves out the split keys: the identity
    of the preparation alone, which survives an image file deleted or edited since (the report shows a placeholder)."""
    manifest = Path(data_dir) / "manifest.csv"
    ident = {"data_dir": str(Path(data_dir).resolve()), "manifest_key": file_sha256(manifest)[:16] if manifest.is_file() else None}
    if images:
        ident.update({f"{split}_key": listing_key(list_split(data_dir, split)) for split in SPLITS})
    return ident


def check_manifest(data_dir, listings: dict) -> None:
    """prepare_data.py's manifest.csv, where there is one, must describe the folder as it is: parsed with its columns,
    and per split one row per image, index i naming the i-th listed file (compared by split/class/file, so a moved
    data folder still matches). Notebook joins go through it; a garbage or truncated one is refused with one line."""
    from lib.files import read_table

    path = Path(data_dir) / "manifest.csv"
    if not path.exists():
        return  # an image folder prepared by other means: nothing to check
    fix = f"re-prepare {data_dir} with prepare_data.py --overwrite"
    table = read_table(path, {"split": "str", "index": "int", "path": "str", "label": "int"}, fix)
    for split, listing in listings.items():
        rows = table[table.split == split].sort_values("index")
        tail = lambda p: tuple(Path(p).parts[-3:])
        if len(rows) != len(listing.paths) or rows["index"].tolist() != list(range(len(listing.paths))) or \
                [tail(p) for p in rows.path] != [tail(p) for p in listing.paths]:
            raise UserError(f"{path} does not describe the {split} split of {data_dir} ({len(rows)} rows, {len(listing.paths)} "
                            f"images): truncated, edited or of another preparation; {fix}")


def split_key(data_dir) -> str | None:
    """Which images went to which split: a key of prepare_data.py's split settings and raw files (not of labels, which
    --relabel and --label_noise change without moving an image between splits). None for data it did not prepare."""
    import hashlib
    import json

    try:
        saved = json.loads((Path(data_dir) / "prepare_args.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or "raw_key" not in saved:
        return None
    split = {k: saved.get(k) for k in ("raw_key", "seed", "test_fraction", "val_fraction")}
    return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()[:16]


def check_same_split(ckpt: dict, data_dir, model_path) -> None:
    """Refuse to evaluate a model on data split otherwise than the data it was trained on (re-prepared with another
    --seed or fractions, or from other raw files): its test images could be its own training images."""
    then, now = ckpt.get("split_key"), split_key(data_dir)
    if then and now and then != now:
        raise UserError(f"{model_path} was trained on another split of the data than {data_dir} has now (prepare_data.py "
                        "was rerun with another --seed, fraction or raw files): its test images may be its training "
                        "images; retrain on this split, or re-prepare with the settings it was trained on")


def build_transform(image_size: int, train: bool, hflip: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Train: light random crop (+ optional flip). Eval: resize to image_size x image_size."""
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.85, 1.18), antialias=True)]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps = [T.Resize((image_size, image_size), antialias=True)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(ckpt: dict):
    """The evaluation transform a checkpoint was trained for (its image size and normalisation)."""
    return build_transform(ckpt["image_size"], train=False, mean=ckpt["mean"], std=ckpt["std"])


class ImageListDataset:
    """(image tensor, label, index) for a list of paths; index is the split position."""

    def __init__(self, listing: SplitListing, transform, indices=None):
        self.listing = listing
        self.transform = transform
        self.indices = np.arange(len(listing.paths)) if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        idx = int(self.indices[i])
        path = self.listing.paths[idx]
        try:
            image = load_rgb(path)
        except ValueError as e:
            raise UserError(str(e)) from None
        return self.transform(image), int(self.listing.labels[idx]), idx


def read_review_csv(csv_path, flag: str, decision: str):
    """A CSV of image rows; with a `decision` column (a review export) only the rows marked `decision`."""
    import pandas as pd

    try:
        table = pd.read_csv(csv_path)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {csv_path}: cannot read it as CSV ({first_line(e)})") from None
    if "decision" in table.columns:
        table = table[table.decision.astype(str).str.strip().str.lower() == decision]
    return table


def read_exclusions(csv_path: str | os.PathLike, listing: SplitListing) -> np.ndarray:
    """Training indices to leave out, from a CSV with a `train_idx` or a `path` column.

    With a `decision` column (the review export), only rows marked `drop` count. Every row must
    name an image of this split: an unknown path or an index out of range is a UserError.
    """
    import pandas as pd

    table = read_review_csv(csv_path, "--exclude", "drop")
    if {"train_idx", "path"} <= set(table.columns):
        # A review export names each image twice: its index then and its file. Both must still agree, or the data
        # were re-prepared (or relabelled) since the review and the index now means another image.
        idx = pd.to_numeric(table.train_idx, errors="coerce")
        position = {str(Path(p).resolve()): i for i, p in enumerate(listing.paths)}
        for row, (i, path) in enumerate(zip(idx, table.path.astype(str)), start=2):
            now = position.get(str(Path(path).resolve()), -1)
            if now < 0:
                raise UserError(f"--exclude {csv_path}: row {row}: {path} is not a training image of this data (re-prepared or "
                                "relabelled since the review?); review the current data again")
            if i != now:
                raise UserError(f"--exclude {csv_path}: row {row}: {path} is training image #{now} now, not #{table.train_idx.iloc[row - 2]}; the data changed "
                                "since the review: review the current data again")
        return np.unique(idx.to_numpy(dtype=np.int64))
    if "train_idx" in table.columns:
        idx = pd.to_numeric(table.train_idx, errors="coerce")
        bad = table[idx.isna() | (idx < 0) | (idx >= len(listing.paths)) | (idx % 1 != 0)]
        if len(bad):
            raise UserError(f"--exclude {csv_path}: train_idx {bad.train_idx.iloc[0]!r} is not an index of the "
                            f"{len(listing.paths)} training images")
        return np.unique(idx.to_numpy(dtype=np.int64))
    if "path" in table.columns:
        position = {str(Path(p).resolve()): i for i, p in enumerate(listing.paths)}
        found = [position.get(str(Path(p).resolve()), -1) for p in table.path.astype(str)]
        if -1 in found:
            raise UserError(f"--exclude {csv_path}: {table.path.iloc[found.index(-1)]} is not a training image of this data")
        return np.unique(np.asarray(found, dtype=np.int64))
    raise UserError(f"--exclude {csv_path}: needs a train_idx or a path column")


def make_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, device: str = "cpu", sampler=None, seed: int = 0,
                drop_last: bool = False):
    import torch

    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=str(device).startswith("cuda"),
        persistent_workers=False,
        generator=generator,
        drop_last=drop_last,
    )


FALSE_PREDICTION_COLUMNS = {"split": "str", "index": "int", "path": "str", "true_label": "str", "pred_label": "str",
                            "confidence": "float"}


def read_false_predictions(csv_path, data_dir, model_sha256: str | None = None, images: bool = True):
    """false_prediction.py's table, checked: its columns and cell types, and the record beside it (the model and the
    data it came from) against `data_dir` as it is now (and `model_sha256`, when given; images=False: the preparation
    only, see data_identity). One UserError line otherwise."""
    from lib.files import identity_mismatch, read_json, read_table

    csv_path = Path(csv_path)
    fix = f"rerun false_prediction.py --data_dir {data_dir}"
    if not csv_path.exists():
        raise UserError(f"{csv_path} is missing; run false_prediction.py first")
    record_path = csv_path.with_suffix(".json")
    if not record_path.exists():
        raise UserError(f"{csv_path} has no {record_path.name} beside it saying which model and data it came from; {fix}")
    record = read_json(record_path, fix)
    differs = identity_mismatch(record, data_identity(data_dir, images))
    if differs:
        raise UserError(f"{csv_path} was computed on other data than {data_dir} ({differs}); {fix}")
    if model_sha256 is not None and record.get("model_sha256") != model_sha256:
        raise UserError(f"{csv_path} lists the mistakes of {record.get('model')}, not of this --model; "
                        f"rerun false_prediction.py with the same --model")
    table = read_table(csv_path, FALSE_PREDICTION_COLUMNS, fix)
    if record.get("csv_sha256") != file_sha256(csv_path):  # the record names the table's bytes, not only its inputs
        raise UserError(f"{csv_path} is not the table its record {record_path.name} describes (edited, replaced or written "
                        f"by an older version); {fix}")
    if not table.split.isin(SPLITS).all():
        raise UserError(f"{csv_path}: column split has {table.split[~table.split.isin(SPLITS)].iloc[0]!r}, not train or test; {fix}")
    names = set(list_split(data_dir, "train").class_names)
    for column in ("true_label", "pred_label"):
        bad = table[column][~table[column].isin(names)]
        if len(bad):
            raise UserError(f"{csv_path}: {column} {str(bad.iloc[0])[:40]!r} is not a class of {data_dir}; {fix}")
    if images:
        for split in sorted(set(table.split)):
            listing = list_split(data_dir, split)
            rows = table[table.split == split]
            ok = [0 <= i < len(listing.paths) and (listing.paths[i] == p or os.path.realpath(listing.paths[i]) == os.path.realpath(p))
                  for i, p in zip(rows["index"], rows["path"])]
            if not all(ok):
                row = rows.iloc[ok.index(False)]
                raise UserError(f"{csv_path}: {split} image {row['index']} ({str(row['path'])[:60]}) is not that image of "
                                f"{data_dir}; {fix}")
    return table, record
