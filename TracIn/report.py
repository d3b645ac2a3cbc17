"""A static HTML results browser: open TracIn/results/report/index.html from disk (no server, no network).

    $ python -m TracIn.report
    $ python -m TracIn.report --results_dir TracIn/results --show_k 10 --candidates 1000

Views: overview (the run's numbers, the figures, the mislabel and counterfactual tables); test images
(filter by class and correct/mispredicted, jump to an index or file name, each image's top proponents and
opponents, the main lists (efficient_tracin's default: influence_last) beside a second run of the same checkpoints:
--compare_dir, or the first subfolder of results_dir whose record says it is one, e.g. normalized/ as the demo makes it); training images (the mislabel candidates ranked with every detector column, their
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

Every tool's output is read through that tool's reader (`mislabel_detection.load`, `false_prediction.load`,
`gradCAM_evaluation.load`, `analyze_topk_results.load`, `evaluate.load`, `counterfactual_check.load`, `lds.load`),
which skips a missing or stale output with a note; `build` joins small per-view functions over them. Why one module
over 300 lines: every view reads the same loaded run and its index maps, and is coerced by the same two helpers; the
page itself (report_assets/) is apart.
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

from lib.cli import UserError, cli, nonneg_int, positive_int
from lib.data_utils import SplitListing, data_identity, list_split
from lib.files import identity_mismatch, read_table
from lib.ownership import Owner, owner_of
from lib.outputs import load_evaluation, load_false_predictions, load_gradcam
from lib.processes import quiet_worker
from TracIn import analyze_topk_results, counterfactual_check, lds, mislabel_detection
from TracIn.core.methods import DEFAULT_SCORE_FN, SEED_SCORE_FN
from TracIn.core.results import RECORD, appearances, explained_model, index_of, load_results, run_id
from TracIn.core.run_folder import tool_folder

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
                                                       "shown beside the main lists (default: the first subfolder of results_dir "
                                                       "whose run.json records such a run)")
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
    if args["score_fn"] != SEED_SCORE_FN:
        return args["score_fn"]
    return KINDS[args["normalize"]]


def comparison(main, res_dir: Path, compare_dir, notes: list[str]) -> dict:
    """The main lists and, beside them, a run of the same checkpoints with another --score_fn or --normalize: the
    --compare_dir given, or the first of results_dir's subfolders holding a run (its record) that is comparable."""
    lists = {list_kind(main): main}
    candidates = [Path(compare_dir)] if compare_dir else [p for p in sorted(res_dir.iterdir()) if (p / RECORD).is_file()]
    found = [p for p in candidates if (p / RECORD).exists()]
    if not found:
        kind, flags = (("normalized", "--score_fn tracin --normalize train") if list_kind(main) != "normalized" else
                       (DEFAULT_SCORE_FN, f"--score_fn {DEFAULT_SCORE_FN}"))
        path = Path(compare_dir) if compare_dir else res_dir / kind
        notes.append(f"only the {list_kind(main)} lists: no second run in {path} (python -m TracIn.efficient_tracin "
                     f"{flags} --output_dir {path} --cache_dir {main.path / 'factors'})")
    for path in found:
        other = load_results(path)
        if (other.record["identity"]["checkpoint_sha256"] != main.record["identity"]["checkpoint_sha256"]
                or other.record["data"] != main.record["data"]):
            notes.append(f"second lists skipped: {path} was computed from other checkpoints or data than {main.path}")
        elif list_kind(other) not in lists:
            lists[list_kind(other)] = other
            break
    return lists


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


# ---------------------------------------------------------------- views: each reads the run and the tools' readers
def open_run(args):
    """The run, checked against --data_dir (a re-prepared folder is refused; an image gone or edited since only gets a
    placeholder and a note), and the report folder it may replace."""
    res_dir = Path(args.results_dir)
    r = load_results(res_dir)
    if Path(args.data_dir).resolve() != Path(r.record["data"]["data_dir"]):
        raise UserError(f"{res_dir} was computed on --data_dir {r.record['data']['data_dir']}, not {args.data_dir}")
    differs = identity_mismatch(r.record["data"], data_identity(args.data_dir, images=False))
    if differs:
        raise UserError(f"{args.data_dir} was prepared again since TracIn ran on it ({differs}); rerun "
                        f"TracIn/efficient_tracin.py --output_dir {res_dir}")
    out = Owner(TOOL).folder(args.out_dir or res_dir / "report", "--out_dir").path  # only a folder the report wrote
    return r, out


def candidates_view(det, n_train: int, limit: int):
    """The mislabel candidates shown (best first, `limit` of them) and their detector columns."""
    if det is None:
        return None, []
    cand = det.candidates
    cand = cand[(cand.train_idx >= 0) & (cand.train_idx < n_train)].sort_values("rank").head(limit)
    return cand, det.detectors


def mispredictions_view(fp, cams, sizes: dict) -> list[dict]:
    """One row per mispredicted image in the splits, with its Grad-CAM map's file name where there is one."""
    rows = []
    for row in ([] if fp is None else fp.table.to_dict("records")):
        if not 0 <= row["index"] < sizes[row["split"]]:
            continue
        cam = cams.map(row["index"]) if cams is not None and row["split"] == "test" else None
        rows.append({"split": row["split"], "idx": int(row["index"]), "true": str(row["true_label"]),
                     "pred": str(row["pred_label"]), "confidence": rounded([row["confidence"]], 3)[0],
                     "cam": None if cam is None else cam.name})
    return rows


def train_view(r, lists: dict, list_rows: dict, show_k: int, cand, detectors: list, mis_rows: list, train_list):
    """Which training images the report shows (candidates first, then those in shown lists or mispredictions) and,
    per image, its candidate scores, its appearances in the run's full top-k lists and the test images it
    influences most."""
    order = [] if cand is None else [int(i) for i in cand.train_idx]
    listed = set()
    for kind, run in lists.items():
        rows = list_rows[kind][list_rows[kind] >= 0]
        for name in ("top_k_influences_indices", "top_k_opponents_indices"):
            listed.update(np.unique(np.asarray(run[name])[rows, :show_k]).tolist())
    listed.update(m["idx"] for m in mis_rows if m["split"] == "train")
    order += sorted(listed - set(order))

    test_ids = np.asarray(r["test_indices"])
    n_train = len(train_list.paths)
    n_prop, n_opp = appearances(r, "proponents", n_train), appearances(r, "opponents", n_train)
    top_p = influenced(np.asarray(r["top_k_influences_indices"]), np.asarray(r["top_k_influences_values"]), test_ids, True)
    top_o = influenced(np.asarray(r["top_k_opponents_indices"]), np.asarray(r["top_k_opponents_values"]), test_ids, False)
    pred_last = r.train_values("train_pred_last", np.arange(n_train)) if "train_pred_last" in r else np.full(n_train, np.nan)
    cand_by_idx = {} if cand is None else {int(row["train_idx"]): row for row in cand.to_dict("records")}
    records = []
    for i in order:
        c = cand_by_idx.get(i)
        records.append({
            "idx": i, "label": int(train_list.labels[i]), "pred": None if np.isnan(pred_last[i]) else int(pred_last[i]),
            "file": os.path.basename(train_list.paths[i]), "path": train_list.paths[i],
            "rank": None if c is None else int(c["rank"]), "scores": None if c is None else rounded([c[d] for d in detectors]),
            "injected": None if c is None or "truly_mislabeled" not in c else str(c["truly_mislabeled"]).strip().lower() == "true",
            "in_proponent_lists": int(n_prop[i]), "in_opponent_lists": int(n_opp[i]),
            "helps_most": top_p.get(i, ([], [])), "hurts_most": top_o.get(i, ([], [])),
        })
    return order, records


def test_view(lists: dict, list_rows: dict, test_ids: np.ndarray, show_k: int) -> list[dict]:
    """Per test image: its lists (show_k) in every available kind."""
    records = []
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
        records.append(rec)
    return records


def figures_view(analysis, det, evaluation, cams) -> list[tuple[Path, str]]:
    """The figures of this run's tools that exist (each reader returns only its own, current ones)."""
    shown = [(analysis and analysis.figure("dashboard"), "TracIn dashboard"),
             (analysis and analysis.figure("concentration"), "concentration of the top-10 lists"),
             (det and det.figure, "mislabel detectors against injected noise"),
             (evaluation and evaluation.figure, "confusion matrix (test)"),
             (cams and cams.figure, "Grad-CAM of mispredicted test images")]
    return [(p, t) for p, t in shown if p]


def run_meta(r) -> dict:
    summary = r.record.get("summary", {})
    return {"n_train": len(r["train_indices"]), "n_test": len(r["test_indices"]), "n_checkpoints": len(r.record.get("checkpoints", [])),
            "layers": [text(l) for l in r.record.get("layers") or []], "normalize": text(r.record["args"]["normalize"]),
            "score_fn": text(r.record["args"]["score_fn"]),
            "seconds": number(summary.get("seconds_total")), "data_dir": text(r.record["data"]["data_dir"]),
            "model": text(f"{explained_model(r.record)}: {r.record.get('checkpoints_chosen') or 'every checkpoint'}"),
            "checkpoints": [{"path": text(c.get("path")), "epoch": number(c.get("epoch")), "lr": number(c.get("lr"))}
                            for c in r.record.get("checkpoints", [])]}


def evaluation_meta(evaluation) -> dict | None:
    if evaluation is None:
        return None
    ev = evaluation.metrics
    return {"accuracy": number(ev.get("accuracy")), "loss": number(ev.get("loss")), "n": number(ev.get("n")),
            "model": text(ev.get("model")), "selected_on": ev.get("selected_on") if ev.get("selected_on") in ("val", "test") else None,
            "selection_accuracy": number(ev.get("selection_accuracy"))}


def mislabel_meta(det) -> dict | None:
    if det is None or not isinstance(det.record.get("metrics"), dict):
        return None
    rec = det.record
    return {"score": text(rec.get("score")), "n_mislabeled": number(rec.get("n_mislabeled")),
            "metrics": {text(d): {text(k): number(v) for k, v in m.items()} for d, m in rec["metrics"].items() if isinstance(m, dict)}}


def counterfactual_meta(checks: dict) -> dict:
    return {text(k): {"retrain": text(v.get("retrain")), "seeds": number(v.get("seeds")), "n_group": len(v.get("group", [])),
                      "summary": {text(m): {f: number(row.get(f)) for f in ("removed", "d_loss_mean", "d_loss_std", "d_flips_mean")}
                                  | {"beats_random": bool(row.get("beats_random"))}
                                  for m, row in v.get("summary", {}).items() if isinstance(row, dict)}}
            for k, v in checks.items()}


def lds_meta(result: dict | None) -> dict | None:
    if result is None:
        return None
    return {"retrain": text(result.get("retrain")), "subsets": number(result.get("reported_subsets")),
            "n_test": number(result.get("n_test")), "accuracy": number(result.get("subset_model_accuracy")),
            "methods": {text(m): {"lds": number(v.get("lds")), "ci_low": number(v["ci95"][0]), "ci_high": number(v["ci95"][1]),
                                  "damping": number(v.get("damping"))} for m, v in result["methods"].items()}}


def build(args) -> dict:
    t0 = time.time()
    notes: list[str] = []
    r, out = open_run(args)
    this_run = run_id(r.record)
    train_list, test_list = (split_listing(args.data_dir, split, r.record, notes) for split in ("train", "test"))
    k_run = r["top_k_influences_indices"].shape[1]
    show_k = min(args.show_k, k_run)
    test_ids = np.asarray(r["test_indices"])

    lists = comparison(r, Path(args.results_dir), args.compare_dir, notes)
    list_rows = {}
    for kind, run in lists.items():
        rows = index_of(run["test_indices"], test_ids)  # the same test image's row in each run (-1: not scored there)
        list_rows[kind] = rows
        if (rows < 0).any():
            notes.append(f"{kind} lists: {(rows < 0).sum()} test images of the main run were not scored there")

    # the tools' outputs, each through its reader: a missing or stale one is a note
    det = mislabel_detection.load(r, notes)
    fp = load_false_predictions(args.false_predictions, args.data_dir, r, notes)
    cams = None if fp is None else load_gradcam(fp, notes)
    analysis = analyze_topk_results.load(r, notes)
    evaluation = load_evaluation(args.eval_dir, args.data_dir, r, notes=notes)
    checks = counterfactual_check.load(r, notes)
    lds_result = lds.load(r, notes)

    cand, detectors = candidates_view(det, len(train_list.paths), args.candidates)
    mis_rows = mispredictions_view(fp, cams, {"train": len(train_list.paths), "test": len(test_list.paths)})
    order, train_records = train_view(r, lists, list_rows, show_k, cand, detectors, mis_rows, train_list)
    test_records = test_view(lists, list_rows, test_ids, show_k)
    figures = figures_view(analysis, det, evaluation, cams)
    meta = {
        "run_id": this_run, "built": time.strftime("%Y-%m-%d %H:%M"), "class_names": list(train_list.class_names),
        "show_k": show_k, "top_k": int(k_run), "kinds": list(lists), "notes": notes, "detectors": detectors,
        "default_detector": None if det is None else text(det.record.get("score")), "run": run_meta(r),
        "evaluation": evaluation_meta(evaluation), "mislabel": mislabel_meta(det), "counterfactual": counterfactual_meta(checks),
        "lds": lds_meta(lds_result), "figures": [{"file": f"figures/{p.name}", "title": t} for p, t in figures],
        "test": {"idx": test_ids.tolist(), "label": test_list.labels[test_ids].tolist(), "pred": np.asarray(r["test_pred"]).tolist(),
                 "file": [os.path.basename(test_list.paths[t]) for t in test_ids]},
        "test_chunk": TEST_CHUNK, "train_chunk": TRAIN_CHUNK, "train_order": order,
        "n_candidates": 0 if cand is None else len(cand), "mispredictions": len(mis_rows),
    }
    stats = write(out, args, this_run, train_list, test_list, test_ids, order, test_records, train_records, mis_rows,
                  meta, figures, cams, notes)
    stats.update({"seconds": time.time() - t0, "test_images": len(test_records), "training_images": len(train_records),
                  "kinds": list(lists), "notes": notes, "out": str(out)})
    return stats


def write(out: Path, args, this_run: str, train_list, test_list, test_ids, order, test_records, train_records, mis_rows,
          meta, figures, cams, notes) -> dict:
    """The whole report folder built beside the old one and swapped in (report.js, data, index.html, ...); thumbnails
    of the old one are carried over (hard links) and reused only when made from the very same file."""
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
                    shutil.copy2(cams.folder / m["cam"], build / "gradcam" / m["cam"])
        for name in ("report.js", "report.css", "index.html"):
            shutil.copy2(ASSETS / name, build / name)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"seconds_thumbnails": t_thumbs, "thumbnails_made": made, "thumbnails_kept": kept, "missing_images": len(missing),
            "bytes": size}

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
