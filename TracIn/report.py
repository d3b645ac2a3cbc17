"""A static HTML results browser: open TracIn/results/report/index.html from disk (no server, no network).

    $ python -m TracIn.report
    $ python -m TracIn.report --results_dir TracIn/results --show_k 10 --candidates 1000

Views: overview (the run's numbers, the figures, the mislabel and counterfactual tables); test images
(filter by class and correct/mispredicted, jump to an index or file name, each image's top proponents and
opponents, the main lists (efficient_tracin's default: influence_last) beside a second run of the same checkpoints in
results_dir/normalized, raw or influence_last, e.g. normalised TracIn as the demo makes it); training images (the mislabel candidates ranked with every detector column, their
appearances in the lists, the test images each one influences most); mispredictions (false_predictions.csv,
with Grad-CAM where gradCAM_evaluation.py made one).

Review decisions (keep / drop / relabel to a class) persist in the browser (localStorage, per run) and
export as review.csv with columns train_idx, path, decision, new_class, which the repository's tools read:
`train.py --exclude review.csv` leaves out the rows marked drop, `prepare_data.py --relabel review.csv
--overwrite` moves the rows marked relabel.

Data files are JavaScript (data/*.js, loaded by <script> tags on demand in chunks) because browsers refuse
fetch() from file://. Thumbnails (thumbs/, only of images the report shows) are kept between builds while
their source file is unchanged. Missing optional inputs are named on the overview page; an image file that
has gone since the run shows a placeholder.

Why one module over 300 lines: every part of the page's data (overview, test lists, training candidates,
mispredictions, thumbnails) reads the same loaded run and its index maps, and is coerced by the same two helpers;
the page itself (report_assets/) is apart.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd

from lib.checkpoints import model_difference
from lib.cli import UserError, cli, first_line, nonneg_int, positive_int
from lib.data_utils import SplitListing, data_identity, list_split, read_false_predictions
from lib.files import identity_mismatch, read_table
from lib.ownership import Owner, owner_of
from lib.processes import quiet_worker
from TracIn.core.results import RECORD, appearances, explained_model, index_of, load_results, run_id
from TracIn.core.run_folder import current, tool_folder

log = logging.getLogger(__name__)
TOOL = "report"
ASSETS = Path(__file__).parent / "report_assets"
THUMB = 96
TEST_CHUNK, TRAIN_CHUNK = 100, 200
INFLUENCED = 8  # test images listed per training image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results_dir", default="TracIn/results", help="efficient_tracin.py output (default TracIn/results)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--compare_dir", default=None, help="a run of the same checkpoints with another --score_fn or --normalize, "
                                                       "shown beside the main lists (default: the first of results_dir/normalized, "
                                                       "raw, influence_last that holds a run)")
    p.add_argument("--false_predictions", default="false_predictions", help="false_prediction.py and Grad-CAM output: the folder or its false_predictions.csv (default false_predictions)")
    p.add_argument("--eval_dir", default="models/evaluation", help="evaluate.py output (default models/evaluation)")
    p.add_argument("--out_dir", default=None, help="report folder (default results_dir/report)")
    p.add_argument("--show_k", type=positive_int, default=10, help="proponents and opponents shown per test image (default 10)")
    p.add_argument("--candidates", type=positive_int, default=1000, help="mislabel candidates listed, by rank (default 1000)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="processes making thumbnails (default 2)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- thumbnails
def write_thumbnail(job) -> bool:
    src, dst = job
    from PIL import Image

    try:
        with Image.open(src) as im:
            im.draft("RGB", (THUMB, THUMB))  # JPEG: decode at reduced size
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            tmp = f"{dst}.tmp-{os.getpid()}"
            im.save(tmp, format="JPEG", quality=85)
            os.replace(tmp, dst)
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def source_key(src: str) -> str | None:
    """What a thumbnail was made from: the source's path, size and mtime (None: the source is gone)."""
    try:
        st = os.stat(src)
    except OSError:
        return None
    return f"{os.path.abspath(src)}|{st.st_size}|{st.st_mtime_ns}"


def make_thumbnails(wanted: dict[str, str], num_workers: int, index: dict) -> tuple[int, int, list[str]]:
    """wanted: thumbnail path -> source image; index: thumbnail path -> source_key it was made from (updated).
    Reuses a thumbnail only when made from this very file (path, size, mtime): another data set's or a
    re-prepared image's thumbnail at the same name is made anew. Returns (made, kept, missing sources)."""
    jobs, kept, missing = [], 0, []
    for dst, src in wanted.items():
        key = source_key(src)
        if key is None:
            missing.append(src)
            continue
        if os.path.exists(dst) and index.get(dst) == key:
            kept += 1
        else:
            index[dst] = key
            jobs.append((src, dst))
    for d in {os.path.dirname(d) for d in wanted}:
        os.makedirs(d, exist_ok=True)
    if num_workers > 1 and len(jobs) > 200:
        with Pool(num_workers, initializer=quiet_worker) as pool:
            ok = pool.map(write_thumbnail, jobs, chunksize=64)
    else:
        ok = [write_thumbnail(j) for j in jobs]
    missing += [src for (src, _), good in zip(jobs, ok) if not good]
    for (src, dst), good in zip(jobs, ok):
        if not good:
            index.pop(dst, None)
    return sum(ok), kept, missing


# ---------------------------------------------------------------- data
def js_file(path: Path, call: str, *args) -> None:
    """A data file the page loads with a <script> tag: `call(arg, ...);`, or `window.X = arg;` for the meta data."""
    text = [json.dumps(a, separators=(",", ":"), allow_nan=False) for a in args]
    path.write_text(f"window.{call} = {text[0]};\n" if call == "REPORT_META" else f"{call}({','.join(text)});\n")


def rounded(values, digits: int = 4) -> list:
    out = []
    for v in np.asarray(values, dtype=np.float64).ravel():
        out.append(None if not math.isfinite(v) else float(f"{v:.{digits}g}"))
    return out


def read_optional_json(path: Path, notes: list[str]):
    """An optional JSON input: None (with a note) when absent or unreadable; the report never fails on it."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        notes.append(f"{path} skipped: cannot read it ({first_line(e)})")
        return None
    return value if isinstance(value, dict) else None


def derived_json(path: Path, this_run: str, notes: list[str]):
    """A derived output's record, only when it was computed from this TracIn run (its tracin_run key)."""
    value = read_optional_json(path, notes)
    if value is not None and value.get("tracin_run") != this_run:
        notes.append(f"{path.parent / path.name} skipped: it was computed from another TracIn run "
                     f"({value.get('tracin_run') or 'unknown'}, this one is {this_run}); rerun the tool that wrote it")
        return None
    return value


def gradcam_matches(cam_dir: Path, fp_record: dict, notes: list[str]) -> bool:
    """Whether the Grad-CAM maps in cam_dir were made with the model and data of the mispredictions table."""
    if not cam_dir.is_dir():
        return False
    ident = read_optional_json(cam_dir / "identity.json", notes) or {}
    keys = ("model_sha256", "data_dir", "manifest_key")
    if any(ident.get(k) != fp_record.get(k) for k in keys):
        notes.append(f"Grad-CAM maps in {cam_dir} skipped: made with another model or data than the mispredictions table "
                     "(rerun python gradCAM_evaluation.py)")
        return False
    return True


def number(value):
    """A value from a result file as a finite number or None: never text that could reach the page as markup."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    return int(v) if v.is_integer() and abs(v) < 2**53 else v


def text(value) -> str | None:
    """A value from a result file as plain text (the page sets it with textContent or escapes it)."""
    return None if value is None else str(value)


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def split_listing(data_dir, split: str, record: dict, notes: list[str]) -> SplitListing:
    """The split as the run saw it. An image file gone since then must not break the report: when the
    folder no longer matches the run, the names come from prepare_data.py's manifest (and thumbnails
    of the gone files become placeholders)."""
    data = record["data"]
    n = data[f"n_{split}_split"]
    try:
        listing = list_split(data_dir, split)
    except UserError:
        listing = None
    if listing is not None and len(listing.paths) == n and listing.class_names == data["class_names"]:
        return listing
    manifest = Path(data_dir) / "manifest.csv"
    if manifest.exists():
        m = read_table(manifest, {"split": "str", "index": "int", "path": "str", "label": "int"}, f"re-prepare {data_dir}")
        m = m[m.split == split].sort_values("index")
        if len(m) == n:
            notes.append(f"{split}: the folder no longer matches the run ({0 if listing is None else len(listing.paths)} "
                         f"images now, {n} then); image names taken from {manifest}")
            return SplitListing(list(m.path), m.label.to_numpy(np.int64), list(data["class_names"]))
    raise UserError(f"{data_dir} changed since the TracIn run ({split}: {n} images then) and has no manifest that "
                    "matches it; rerun TracIn/efficient_tracin.py")


KINDS = {"none": "raw", "train": "normalized", "both": "cosine"}


def list_kind(run) -> str:
    """The lists' name: TracIn's by its normalisation (raw, normalized, cosine), any other score by its --score_fn."""
    args = run.record["args"]  # its method: checked and filled in by results.check_record
    if args["score_fn"] != "tracin":
        return args["score_fn"]
    return KINDS[args["normalize"]]


def comparable_run(main, path: Path, notes: list[str]):
    """The run beside the main one (another --score_fn or --normalize), if it is a complete run of the same checkpoints."""
    if not (path / RECORD).exists():
        flags = "--score_fn tracin --normalize train" if list_kind(main) != "normalized" else "--score_fn influence_last"
        notes.append(f"only the {list_kind(main)} lists: no second run in {path} (python -m TracIn.efficient_tracin "
                     f"{flags} --output_dir {path} --cache_dir {main.path / 'factors'})")
        return None
    other = load_results(path)
    if (other.record["identity"]["checkpoint_sha256"] != main.record["identity"]["checkpoint_sha256"]
            or other.record["data"] != main.record["data"]):
        notes.append(f"second lists skipped: {path} was computed from other checkpoints or data than {main.path}")
        return None
    return other


def influenced(indices: np.ndarray, values: np.ndarray, test_ids: np.ndarray, descending: bool):
    """Per training index: the test images where it scores highest (descending) or lowest, from the top-k lists."""
    tr = indices.ravel()
    te = np.repeat(test_ids, indices.shape[1])
    v = values.ravel().astype(np.float64)
    order = np.lexsort((-v if descending else v, tr))
    tr, te, v = tr[order], te[order], v[order]
    starts = np.flatnonzero(np.r_[True, tr[1:] != tr[:-1]])
    ends = np.r_[starts[1:], len(tr)]
    return {int(tr[s]): (te[s:min(e, s + INFLUENCED)].tolist(), rounded(v[s:min(e, s + INFLUENCED)])) for s, e in zip(starts, ends)}


def build(args) -> dict:
    t0 = time.time()
    res_dir = Path(args.results_dir)
    r = load_results(res_dir)
    notes: list[str] = []
    if Path(args.data_dir).resolve() != Path(r.record["data"]["data_dir"]):
        raise UserError(f"{res_dir} was computed on --data_dir {r.record['data']['data_dir']}, not {args.data_dir}")
    # The preparation must be the run's (a re-prepared folder is refused); an image file gone or edited since only
    # gets a placeholder and a note.
    differs = identity_mismatch(r.record["data"], data_identity(args.data_dir, images=False))
    if differs:
        raise UserError(f"{args.data_dir} was prepared again since TracIn ran on it ({differs}); rerun "
                        f"TracIn/efficient_tracin.py --output_dir {res_dir}")
    out = Owner(TOOL).folder(args.out_dir or res_dir / "report", "--out_dir").path  # only a folder the report wrote
    this_run = run_id(r.record)
    train_list, test_list = (split_listing(args.data_dir, split, r.record, notes) for split in ("train", "test"))
    names = list(train_list.class_names)
    k_run = r["top_k_influences_indices"].shape[1]
    show_k = min(args.show_k, k_run)
    test_ids = np.asarray(r["test_indices"])

    lists = {list_kind(r): r}
    candidates = [Path(args.compare_dir)] if args.compare_dir else [res_dir / "normalized", res_dir / "raw", res_dir / "influence_last"]
    compare = next((p for p in candidates if (p / RECORD).exists()), candidates[0])
    other = comparable_run(r, compare, notes)
    if other is not None and list_kind(other) not in lists:
        lists[list_kind(other)] = other
    list_rows = {}
    for kind, run in lists.items():
        rows = index_of(run["test_indices"], test_ids)  # the same test image's row in each run (-1: not scored there)
        list_rows[kind] = rows
        if (rows < 0).any():
            notes.append(f"{kind} lists: {(rows < 0).sum()} test images of the main run were not scored there")

    # mislabel candidates (optional)
    mislabel_dir = current(res_dir, "mislabel", this_run, notes)
    cand_path = (mislabel_dir or res_dir / "mislabel") / "mislabel_candidates.csv"
    detectors, cand = [], None
    det_json = read_optional_json(mislabel_dir / "mislabel_detection.json", notes) if mislabel_dir else None
    if cand_path.exists() and det_json is not None:
        skip = {"rank", "train_idx", "path", "given_class", "predicted_class", "truly_mislabeled"}
        try:
            header = pd.read_csv(cand_path, nrows=0).columns
        except (OSError, ValueError):
            header = []  # read_table below names the file
        detectors = [str(c) for c in header if c not in skip]
        cand = read_table(cand_path, {"rank": "int", "train_idx": "int", **{d: "float" for d in detectors}},
                          "rerun python -m TracIn.mislabel_detection")
        cand = cand[(cand.train_idx >= 0) & (cand.train_idx < len(train_list.paths))].sort_values("rank").head(args.candidates)
    elif not (res_dir / "mislabel").exists():
        notes.append("no mislabel table (python -m TracIn.mislabel_detection writes mislabel/mislabel_candidates.csv)")

    # mispredictions (optional), with Grad-CAM where present
    fp_dir = Path(args.false_predictions)
    if fp_dir.suffix == ".csv":  # the CSV's own path, the form the other tools take: its folder holds the rest
        fp_dir = fp_dir.parent
    mis_rows, cams_ok = [], False
    if (fp_dir / "false_predictions.csv").exists():
        try:
            fp, fp_record = read_false_predictions(fp_dir / "false_predictions.csv", args.data_dir, images=False)
        except UserError as e:
            fp, fp_record = None, None
            notes.append(f"mispredictions skipped: {e}")
        other = model_difference(r.record.get("model"), fp_record.get("model")) if fp is not None else None
        if other:
            notes.append(f"mispredictions skipped: the TracIn lists and {fp_dir / 'false_predictions.csv'}: {other}; rerun "
                         "false_prediction.py and efficient_tracin.py on the selected model (their defaults)")
            fp = None
        if fp is not None:
            cams_ok = gradcam_matches(fp_dir / "gradcam", fp_record, notes)
            sizes = {"train": len(train_list.paths), "test": len(test_list.paths)}
            for row in fp.to_dict("records"):
                if not 0 <= row["index"] < sizes[row["split"]]:
                    continue
                cam = fp_dir / "gradcam" / f"test_{row['index']}.png"
                mis_rows.append({"split": row["split"], "idx": int(row["index"]), "true": str(row["true_label"]),
                                 "pred": str(row["pred_label"]), "confidence": rounded([row["confidence"]], 3)[0],
                                 "cam": cam.name if cams_ok and row["split"] == "test" and cam.exists() else None})
            if not any(m["cam"] for m in mis_rows) and cams_ok:
                notes.append("no Grad-CAM maps (python gradCAM_evaluation.py writes false_predictions/gradcam/)")
    else:
        notes.append(f"no mispredictions table ({fp_dir / 'false_predictions.csv'}; python false_prediction.py)")

    # which training images the report shows: candidates first, then those in shown lists or mispredictions
    order = [] if cand is None else [int(i) for i in cand.train_idx]
    shown = set(order)
    listed = set()
    for kind, run in lists.items():
        rows = list_rows[kind][list_rows[kind] >= 0]
        for name in ("top_k_influences_indices", "top_k_opponents_indices"):
            listed.update(np.unique(np.asarray(run[name])[rows, :show_k]).tolist())
    listed.update(m["idx"] for m in mis_rows if m["split"] == "train")
    order += sorted(listed - shown)

    # per training image: appearances in the run's full top-k lists and the test images it influences most
    prop_i, prop_v = np.asarray(r["top_k_influences_indices"]), np.asarray(r["top_k_influences_values"])
    opp_i, opp_v = np.asarray(r["top_k_opponents_indices"]), np.asarray(r["top_k_opponents_values"])
    n_train = len(train_list.paths)
    n_prop, n_opp = appearances(r, "proponents", n_train), appearances(r, "opponents", n_train)
    top_p, top_o = influenced(prop_i, prop_v, test_ids, True), influenced(opp_i, opp_v, test_ids, False)
    pred_last = r.train_values("train_pred_last", np.arange(n_train)) if "train_pred_last" in r else np.full(n_train, np.nan)
    cand_by_idx = {} if cand is None else {int(row["train_idx"]): row for row in cand.to_dict("records")}
    train_records = []
    for i in order:
        c = cand_by_idx.get(i)
        train_records.append({
            "idx": i, "label": int(train_list.labels[i]), "pred": None if np.isnan(pred_last[i]) else int(pred_last[i]),
            "file": os.path.basename(train_list.paths[i]), "path": train_list.paths[i],
            "rank": None if c is None else int(c["rank"]), "scores": None if c is None else rounded([c[d] for d in detectors]),
            "injected": None if c is None or "truly_mislabeled" not in c else str(c["truly_mislabeled"]).strip().lower() == "true",
            "in_proponent_lists": int(n_prop[i]), "in_opponent_lists": int(n_opp[i]),
            "helps_most": top_p.get(i, ([], [])), "hurts_most": top_o.get(i, ([], [])),
        })

    # per test image: its lists (show_k) in every available kind
    test_records = []
    for row, t in enumerate(test_ids):
        rec = {"idx": int(t), "lists": {}}
        for kind, run in lists.items():
            rr = int(list_rows[kind][row])
            if rr < 0:
                continue
            rec["lists"][kind] = {"proponents": np.asarray(run["top_k_influences_indices"][rr, :show_k]).tolist(),
                                  "proponent_scores": rounded(run["top_k_influences_values"][rr, :show_k]),
                                  "opponents": np.asarray(run["top_k_opponents_indices"][rr, :show_k]).tolist(),
                                  "opponent_scores": rounded(run["top_k_opponents_values"][rr, :show_k])}
        test_records.append(rec)

    # figures that exist and belong to this run
    analysis_ok = current(res_dir, "analysis", this_run, notes) is not None
    fig_candidates = [(res_dir / "analysis" / "dashboard.png", "TracIn dashboard", analysis_ok),
                      (res_dir / "analysis" / "concentration.png", "concentration of the top-10 lists", analysis_ok),
                      (res_dir / "mislabel" / "mislabel_detection.png", "mislabel detectors against injected noise", det_json is not None),
                      (Path(args.eval_dir) / "confusion_matrix_test.png", "confusion matrix (test)", True),
                      (fp_dir / "gradcam_mispredictions.png", "Grad-CAM of mispredicted test images", cams_ok)]
    figures = [(p, t) for p, t, ok in fig_candidates if ok and p.exists()]

    evaluation = read_optional_json(Path(args.eval_dir) / "metrics_test.json", notes)
    if evaluation is not None and identity_mismatch(evaluation, data_identity(args.data_dir, images=False)):
        notes.append(f"{Path(args.eval_dir) / 'metrics_test.json'} skipped: computed on other data (rerun evaluate.py)")
        evaluation = None
    other = model_difference(r.record.get("model"), evaluation.get("model_record")) if evaluation is not None else None
    if other:
        notes.append(f"{Path(args.eval_dir) / 'metrics_test.json'} skipped: the TracIn lists and the evaluation: {other}; "
                     "rerun evaluate.py and efficient_tracin.py on the selected model (their defaults)")
        evaluation = None
    counterfactual = {}
    for path in sorted(res_dir.glob("counterfactual/*/counterfactual.json")):
        cf = derived_json(path, this_run, notes)
        if cf is not None:
            counterfactual[path.parent.name] = cf
    lds_result = derived_json(res_dir / "lds" / "lds.json", this_run, notes)
    summary = r.record.get("summary", {})
    meta = {
        "run_id": this_run, "built": time.strftime("%Y-%m-%d %H:%M"), "class_names": names, "show_k": show_k, "top_k": int(k_run),
        "kinds": list(lists), "notes": notes, "detectors": detectors,
        "default_detector": None if det_json is None else text(det_json.get("score")),
        "run": {"n_train": len(r["train_indices"]), "n_test": len(test_ids), "n_checkpoints": len(r.record.get("checkpoints", [])),
                "layers": [text(l) for l in r.record.get("layers") or []], "normalize": text(r.record["args"]["normalize"]),
                "score_fn": text(r.record["args"]["score_fn"]),
                "seconds": number(summary.get("seconds_total")), "data_dir": text(r.record["data"]["data_dir"]),
                "model": text(f"{explained_model(r.record)}: {r.record.get('checkpoints_chosen') or 'every checkpoint'}"),
                "checkpoints": [{"path": text(c.get("path")), "epoch": number(c.get("epoch")), "lr": number(c.get("lr"))}
                                for c in r.record.get("checkpoints", [])]},
        "evaluation": None if evaluation is None else {"accuracy": number(evaluation.get("accuracy")), "loss": number(evaluation.get("loss")),
                                                       "n": number(evaluation.get("n")), "model": text(evaluation.get("model")),
                                                       "selected_on": evaluation.get("selected_on") if evaluation.get("selected_on") in ("val", "test") else None,
                                                       "selection_accuracy": number(evaluation.get("selection_accuracy"))},
        "mislabel": None if det_json is None or not isinstance(det_json.get("metrics"), dict) else {
            "score": text(det_json.get("score")), "n_mislabeled": number(det_json.get("n_mislabeled")),
            "metrics": {text(d): {text(k): number(v) for k, v in m.items()} for d, m in det_json["metrics"].items() if isinstance(m, dict)}},
        "counterfactual": {text(k): {"retrain": text(v.get("retrain")), "seeds": number(v.get("seeds")), "n_group": len(v.get("group", [])),
                                     "summary": {text(m): {f: number(row.get(f)) for f in ("removed", "d_loss_mean", "d_loss_std", "d_flips_mean")}
                                                 | {"beats_random": bool(row.get("beats_random"))}
                                                 for m, row in v.get("summary", {}).items() if isinstance(row, dict)}}
                           for k, v in counterfactual.items()},
        "lds": None if lds_result is None else {
            "retrain": text(lds_result.get("retrain")), "subsets": number(lds_result.get("reported_subsets")),
            "n_test": number(lds_result.get("n_test")), "accuracy": number(lds_result.get("subset_model_accuracy")),
            "methods": {text(m): {"lds": number(v.get("lds")), "ci_low": number((v.get("ci95") or [None, None])[0]),
                                  "ci_high": number((v.get("ci95") or [None, None])[1]), "damping": number(v.get("damping"))}
                        for m, v in (lds_result.get("methods") or {}).items() if isinstance(v, dict)}},
        "figures": [{"file": f"figures/{p.name}", "title": t} for p, t in figures],
        "test": {"idx": test_ids.tolist(), "label": test_list.labels[test_ids].tolist(), "pred": np.asarray(r["test_pred"]).tolist(),
                 "file": [os.path.basename(test_list.paths[t]) for t in test_ids]},
        "test_chunk": TEST_CHUNK, "train_chunk": TRAIN_CHUNK, "train_order": order,
        "n_candidates": 0 if cand is None else len(cand), "mispredictions": len(mis_rows),
    }

    # write: the whole report folder built beside the old one and swapped in (report.js, data, index.html, ...);
    # thumbnails of the old one are carried over (hard links) and reused only when made from the very same file
    with tool_folder(out, TOOL, {"tracin_run": this_run, "data_dir": str(Path(args.data_dir).resolve())}) as build:
        index = {}
        if (out / "thumbs").is_dir() and owner_of(out) == TOOL:
            shutil.copytree(out / "thumbs", build / "thumbs", copy_function=link_or_copy)
            try:
                index = {str(build / k): v for k, v in json.loads((out / "thumbs" / "index.json").read_text()).items()}
            except (OSError, ValueError, AttributeError):
                index = {}
        # every test image of the run and every training image the report shows
        thumbs = {str(build / "thumbs" / "test" / f"{t}.jpg"): test_list.paths[t] for t in test_ids}
        thumbs.update({str(build / "thumbs" / "train" / f"{i}.jpg"): train_list.paths[i] for i in order})
        thumbs.update({str(build / "thumbs" / "test" / f"{m['idx']}.jpg"): test_list.paths[m["idx"]] for m in mis_rows if m["split"] == "test"})
        t_thumbs = time.time()
        made, kept, missing = make_thumbnails(thumbs, args.num_workers, index)
        t_thumbs = time.time() - t_thumbs
        (build / "thumbs").mkdir(exist_ok=True)
        (build / "thumbs" / "index.json").write_text(json.dumps({str(Path(k).relative_to(build)): v for k, v in index.items()
                                                                 if k in thumbs}))
        if missing:
            notes.append(f"{len(missing)} image file(s) could not be read since the run (placeholders shown), e.g. {missing[0]}")
        (build / "data").mkdir()
        (build / "figures").mkdir()
        for c in range(0, len(test_records), TEST_CHUNK):
            js_file(build / "data" / f"test_{c // TEST_CHUNK}.js", "REPORT_CHUNK", "test", c // TEST_CHUNK,
                    test_records[c:c + TEST_CHUNK])
        for c in range(0, len(train_records), TRAIN_CHUNK):
            js_file(build / "data" / f"train_{c // TRAIN_CHUNK}.js", "REPORT_CHUNK", "train", c // TRAIN_CHUNK,
                    train_records[c:c + TRAIN_CHUNK])
        js_file(build / "data" / "mis_0.js", "REPORT_CHUNK", "mis", 0, mis_rows)
        js_file(build / "data" / "meta.js", "REPORT_META", meta)
        for p, _ in figures:
            shutil.copy2(p, build / "figures" / p.name)
        if any(m["cam"] for m in mis_rows):
            (build / "gradcam").mkdir()
            for m in mis_rows:
                if m["cam"]:
                    shutil.copy2(fp_dir / "gradcam" / m["cam"], build / "gradcam" / m["cam"])
        for name in ("report.js", "report.css", "index.html"):
            shutil.copy2(ASSETS / name, build / name)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    stats = {"seconds": time.time() - t0, "seconds_thumbnails": t_thumbs, "thumbnails_made": made, "thumbnails_kept": kept,
             "missing_images": len(missing), "bytes": size, "test_images": len(test_records), "training_images": len(train_records),
             "kinds": list(lists), "notes": notes, "out": str(out)}
    return stats


def main(argv=None):
    args = parse_args(argv)
    s = build(args)
    log.info(f"report: {s['test_images']} test and {s['training_images']} training images, lists {', '.join(s['kinds'])}; "
             f"{s['thumbnails_made']} thumbnails made, {s['thumbnails_kept']} kept; {s['bytes'] / 2**20:.1f} MiB in "
             f"{s['seconds']:.1f}s -> open {s['out']}/index.html")
    for note in s["notes"]:
        log.info(f"report note: {note}")
    return 0


if __name__ == "__main__":
    cli(main)
