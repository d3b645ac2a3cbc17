"""The one owner of TracIn's results files: their names, writing them as one run, loading them checked.

    from TracIn.core.results import load_results
    r = load_results("TracIn/results", data_dir="data/processed")   # refuses results of other data
    row = r.test_row(100)                       # row of test image #100 in the [n_test, k] arrays
    r.arrays["top_k_influences_indices"][row]   # its proponents (split indices of the train split)

Writing (`tracin_outputs` builds a finished run's arrays, table and record; `write_run` only writes them): every file
goes to a staging folder first; then the old record (run.json) is removed, the new files replace the old ones, files
the previous run claimed that this one does not write (lib.ownership: only while unchanged) and analysis outputs
derived from the previous run (only those their tool marked as its own) are removed, the record is moved in last and
the run's files are claimed. So a results folder holds one complete run or no record at all, and a run that fails
before the swap leaves the previous results exactly as they were.

Loading (`load_results`): refuses a folder without a record, a corrupt record or array (one line naming the
file), a record with a field of another type than its readers index it as (`check_record`, the one typed reader of
run.json: every tool reads the record through it), and results computed on another data folder or on this folder as it was before being re-prepared
(each split's content key differs), naming what differs.

Why one module over 300 lines: the writer and the checked reader must agree on every file name, shape and identity
field; in one module a change to one is seen beside the other.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lib.cli import UserError
from lib.files import git_commit, identity_mismatch, load_npy, read_json, save_csv, save_json, save_npy
from lib.ownership import claimed, remove_claimed
from TracIn.core.factors import OWNER
from TracIn.core.methods import SCORE_FNS, SEED_SCORE_FN, method_for
from TracIn.core.run_folder import remove_derived

log = logging.getLogger(__name__)

RECORD = "run.json"
# Arrays of one run: [n_test, k] top-k lists, row/column index maps, per-image figures.
ARRAYS = (
    "top_k_influences_values", "top_k_influences_indices",   # proponents, descending
    "top_k_opponents_values", "top_k_opponents_indices",     # opponents, most negative first
    "test_indices", "train_indices",                         # split indices of the rows / of the train arrays
    "test_pred",                                             # the explained model's (last checkpoint's) prediction per test row
    "self_influence",                                        # [n_train] sum_t lr_t |g_t|^2 (optional)
    "train_loss_last", "train_pred_last",                    # [n_train] last checkpoint's loss / prediction
    "train_loss_per_ckpt", "train_margin_per_ckpt",          # [n_ckpt, n_train] loss, logit margin per checkpoint
    "train_el2n_per_ckpt",                                   # [n_ckpt, n_train] |softmax - onehot| per checkpoint
    "train_grad_sq_norm_per_ckpt",                           # [n_ckpt, n_train] |g_t|^2 (self_influence = lr @ this)
)
REQUIRED = ARRAYS[:7]
TABLES = ("top_k_influences.csv",)
# Outputs of the tools computed from a run are removed when a new run lands (run_folder.remove_derived): the derived
# folders (found by their inputs.json) and the files and links other tools claimed at the root (lib.ownership; removed
# only while unchanged). A user's file or folder is never touched; raw/ and normalized/ are runs of their own (the report
# checks that they match) and stay.


def run_id(record: dict) -> str:
    """A short key of what a run's scores depend on (data content, checkpoints, arguments): derived files record it."""
    return hashlib.sha256(json.dumps(record["identity"], sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_writable_names(out: Path, names) -> None:
    """Before anything changes: every file the swap replaces is absent or a plain file (not a folder or a symlink),
    so the swap cannot stop halfway."""
    for name in names:
        path = out / name
        if path.is_symlink() or path.is_dir():
            raise UserError(f"{path} is a {'symlink' if path.is_symlink() else 'folder'}, where the results file {name} goes; "
                            "nothing was changed: move it away or pass another --output_dir")


def write_run(out: Path, arrays: dict, tables: dict, record: dict) -> None:
    """Write one run's arrays (name -> ndarray or None), tables (file name -> DataFrame) and record."""
    unknown = [n for n in arrays if n not in ARRAYS] + [n for n in tables if n not in TABLES]
    if unknown:
        raise ValueError(f"not a results file of TracIn/core/results.py: {unknown}")
    out = Path(out)
    own_files = [f"{a}.npy" for a in ARRAYS] + list(TABLES) + [RECORD]
    check_writable_names(out, own_files)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    stage = OWNER.folder(staging).fill()  # this writer's own folder: removed below through its record
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
        check_writable_names(out, own_files)
        # The swap: no record while the files change, so a reader never mixes two runs. A results file this run does
        # not write goes only while it is what the previous run claimed (lib.ownership); a file of yours stays.
        remove_claimed(out, [RECORD])
        for name in own_files[:-1]:
            if name in written:
                os.replace(staging / name, out / name)
        remove_claimed(out, [n for n in own_files[:-1] if n not in written])
        remove_derived(out, OWNER.name)
        os.replace(staging / RECORD, out / RECORD)
        OWNER.claim(out, written + [RECORD])
    finally:
        stage.remove()


def tracin_outputs(run, identity: dict, scored, t_start: float) -> tuple[dict, dict, dict, dict]:
    """A finished run (or merge) as results files: (arrays, tables, record, summary) for write_run. run: run.InfluenceRun
    (its config is recorded as "args", --layers expanded); scored: scores.ScoredRun."""
    train_list, test_list, train_ids, test_ids = run.train_list, run.test_list, run.train_ids, run.test_ids
    train_arrays, test_pred, stage_summary = scored.train_arrays, scored.test_pred, scored.summary
    prop_v, prop_i = (x.cpu().numpy() for x in scored.tracker.proponents())
    opp_v, opp_i = (x.cpu().numpy() for x in scored.tracker.opponents())
    names = np.asarray(train_list.class_names)
    frames = []
    for kind, values, indices in (("proponent", prop_v, prop_i), ("opponent", opp_v, opp_i)):
        k = values.shape[1]
        frames.append(pd.DataFrame({
            "test_idx": np.repeat(test_ids, k),
            "test_path": np.repeat(np.asarray(test_list.paths)[test_ids], k),
            "test_label": np.repeat(names[test_list.labels[test_ids]], k),
            "test_pred": np.repeat(names[test_pred], k),
            "kind": kind,
            "rank": np.tile(np.arange(1, k + 1), len(test_ids)),
            "train_idx": indices.ravel(),
            "train_path": np.asarray(train_list.paths)[indices.ravel()],
            "train_label": names[train_list.labels[indices.ravel()]],
            "influence": values.ravel(),
        }))
    table = pd.concat(frames).sort_values(["test_idx", "kind", "rank"], ascending=[True, False, True])

    check_scores(prop_v, opp_v, run.cfg)
    pairs = len(train_ids) * len(test_ids)
    summary = {
        "pairs_scored": pairs, "n_train": len(train_ids), "n_test": len(test_ids), "n_checkpoints": len(run.ckpts),
        "seconds_total": time.time() - t_start, "opponent_negative_share": float((opp_v < 0).mean()),
        "proponent_negative_share": float((prop_v < 0).mean()), **stage_summary,
    }
    arrays = {
        "top_k_influences_values": prop_v.astype(np.float32), "top_k_influences_indices": prop_i.astype(np.int64),
        "top_k_opponents_values": opp_v.astype(np.float32), "top_k_opponents_indices": opp_i.astype(np.int64),
        "test_indices": np.asarray(test_ids, dtype=np.int64), "train_indices": np.asarray(train_ids, dtype=np.int64),
        "test_pred": np.asarray(test_pred, dtype=np.int64),
        # indexed like train_indices.npy (the full split when no --train_subset)
        "self_influence": train_arrays.get("self_influence"),
        "train_loss_last": train_arrays["loss_last"], "train_pred_last": train_arrays["pred_last"],
        "train_loss_per_ckpt": train_arrays["loss_per_ckpt"], "train_margin_per_ckpt": train_arrays["margin_per_ckpt"],
        "train_el2n_per_ckpt": train_arrays["el2n_per_ckpt"], "train_grad_sq_norm_per_ckpt": train_arrays.get("grad_sq_norm_per_ckpt"),
    }
    if scored.factors_sha256 is not None:  # the cached factors' content, which InfluenceRun.factors checks on reuse
        identity = {**identity, "factors_sha256": scored.factors_sha256}
    record = {
        "args": run.recorded_args(), "identity": identity, "git_commit": git_commit(), "device": str(run.device),
        "data": {**{k: identity[k] for k in ("data_dir", "manifest_key", "train_key", "test_key")}, "n_train_split": len(train_list.paths),
                 "n_test_split": len(test_list.paths), "class_names": list(train_list.class_names)},
        "checkpoints": [{"path": str(p), "sha256": sha, "epoch": c["epoch"], "lr": lr, "train_run": c.get("train_run")}
                        for p, c, sha, lr in zip(run.paths, run.ckpts, run.shas, run.lrs)],
        "layers": run.layers, "summary": summary,
        # the model the lists explain (an ensemble: each member's), and how the checkpoints were chosen
        "model": run.explained_models()[0], "members_models": run.explained_models(), "checkpoints_chosen": run.chosen,
    }
    return arrays, {"top_k_influences.csv": table}, record, summary


def check_scores(prop_v: np.ndarray, opp_v: np.ndarray, cfg) -> None:
    """Refuse to record lists whose scores are not finite or all zero (a damping too small to invert the curvature, a
    dead model), naming the flag to change."""
    method = f"--score_fn {cfg.score_fn}" + (f" --damping {cfg.damping:g}" if method_for(cfg.score_fn).damped else "")
    if not (np.isfinite(prop_v).all() and np.isfinite(opp_v).all()):
        share = 1 - np.isfinite(prop_v).mean()
        raise UserError(f"{share:.0%} of the top-k scores are not finite with {method}; nothing was written: raise --damping "
                        f"(the curvature is not invertible at this one) or use --score_fn {SEED_SCORE_FN}")
    if not (prop_v.any() or opp_v.any()):
        raise UserError(f"every score is 0 with {method} (the model's gradients vanish at these checkpoints); nothing was "
                        "written: check the checkpoints (--checkpoints) or --layers")


def previous_method(out: Path) -> str | None:
    """"--score_fn X --normalize Y" of the run now in `out` (None: no readable record)."""
    try:
        was = json.loads((Path(out) / RECORD).read_text())["args"]
        return f"--score_fn {was['score_fn']} --normalize {was['normalize']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


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
        in_split = 0 <= test_idx < self.record["data"]["n_test_split"]  # beyond int64 too: no overflow in index_of
        row = int(index_of(self.arrays["test_indices"], test_idx)[0]) if in_split else -1
        if row < 0:
            raise UserError(f"test image #{test_idx} is not among the {len(self.arrays['test_indices'])} test images of {self.path}")
        return row

    def train_values(self, name: str, train_idx) -> np.ndarray:
        """A per-training-image array (e.g. self_influence) at split indices; NaN where not scored."""
        pos = index_of(self.arrays["train_indices"], train_idx)
        values = np.asarray(self.arrays[name], dtype=np.float64)
        return np.where(pos >= 0, values[np.maximum(pos, 0)], np.nan)


def appearances(r, kind: str, n_train: int) -> np.ndarray:
    """(>= n_train,) in how many test images' top-k lists of `kind` ("proponents" or "opponents") each training image
    is, indexed by split index (r: a TracInResults, or any mapping of its array names)."""
    name = {"proponents": "top_k_influences_indices", "opponents": "top_k_opponents_indices"}[kind]
    return np.bincount(np.asarray(r[name]).ravel(), minlength=n_train)


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
    fix = f"rerun TracIn/efficient_tracin.py --output_dir {results_dir}"
    record = read_json(record_path, fix)
    check_record(record, record_path, fix)
    files = set(record["files"])
    missing = [n for n in list(REQUIRED) + list(need) if f"{n}.npy" not in files or not (results_dir / f"{n}.npy").exists()]
    if missing:
        hint = " (the run used --no_self_influence: rerun without it)" if "self_influence" in missing else ""
        raise UserError(f"{results_dir} lacks {', '.join(missing)}.npy{hint}; rerun TracIn/efficient_tracin.py")
    if data_dir is not None:
        check_data(record, data_dir, results_dir)
    arrays = {n: load_npy(results_dir / f"{n}.npy", "r", fix) for n in ARRAYS if f"{n}.npy" in files}
    check_arrays(record, arrays, results_dir, fix)
    # trusted by content: each array is the one the run recorded writing (its size and sha256), not one put in its place
    changed = [f"{n}.npy" for n in arrays if not claimed(results_dir, f"{n}.npy")]
    if changed:
        raise UserError(f"{results_dir}/{changed[0]} is not the file efficient_tracin wrote there (changed or replaced "
                        f"since; {len(changed)} array(s) so); {fix}")
    return TracInResults(results_dir, record, arrays)


def check_record(record: dict, record_path: Path, fix: str) -> None:
    """The typed reader of run.json: every field a reader indexes has the type it is indexed as (one line naming the
    field otherwise, never a traceback further on), and the record says its method. args.score_fn and args.normalize
    are filled in from the identity where args lacks them (a run of plain TracIn has no score_fn in its identity, so
    its run id stays that of the runs before --score_fn existed); an args.score_fn the identity contradicts is refused."""

    def bad(field: str, value, want: str):
        raise UserError(f"{record_path}: {field} is {str(value)[:40]!r} ({type(value).__name__}), not {want}; {fix}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for field in ("identity", "data", "args", "summary"):
        if not isinstance(record.get(field), dict):
            bad(field, record.get(field), "an object: not a TracIn run record")
    data, args, identity = record["data"], record["args"], record["identity"]
    if not isinstance(data.get("data_dir"), str):
        bad("data.data_dir", data.get("data_dir"), "a path")
    for field in ("n_train_split", "n_test_split"):
        if not is_int(data.get(field)) or data[field] < 1:
            bad(f"data.{field}", data.get(field), "a positive integer")
    names = data.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        bad("data.class_names", names, "a list of class names")
    for field in ("manifest_key", "train_key", "test_key"):
        if data.get(field) is not None and not isinstance(data[field], str):
            bad(f"data.{field}", data[field], "a string")
    ckpts = record.get("checkpoints")
    if not isinstance(ckpts, list) or not ckpts or not all(isinstance(c, dict) for c in ckpts):
        bad("checkpoints", ckpts, "a list of checkpoint records")
    for i, c in enumerate(ckpts):
        for field, ok, want in (("path", isinstance(c.get("path"), str), "a path"),
                                ("sha256", isinstance(c.get("sha256"), str), "a checksum"),
                                ("lr", is_number(c.get("lr")), "a number")):
            if not ok:
                bad(f"checkpoints[{i}].{field}", c.get(field), want)
    for field in ("files", "layers"):
        value = record.get(field, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            bad(field, value, "a list of names")
    if "files" not in record:
        bad("files", None, "a list of names")
    sizes = args.get("member_sizes")
    if sizes and (not isinstance(sizes, list) or not all(is_int(n) and n >= 1 for n in sizes) or sum(sizes) != len(ckpts)):
        bad("args.member_sizes", sizes, f"checkpoints per member summing to the {len(ckpts)} checkpoints")
    for field in ("top_k", "num_shards"):
        if field in args and not (is_int(args[field]) and args[field] >= 1):
            bad(f"args.{field}", args[field], "a positive integer")
    if args.get("data_dir") is not None and not isinstance(args["data_dir"], str):
        bad("args.data_dir", args["data_dir"], "a path")
    # the method: what the identity (the run id) says; args must agree
    method = identity.get("score_fn", SEED_SCORE_FN)
    score_fn = args.get("score_fn", method)
    if score_fn not in SCORE_FNS:
        raise UserError(f"{record_path}: args.score_fn {str(score_fn)[:40]!r} is not a method of this version "
                        f"({', '.join(SCORE_FNS)}); {fix}")
    if score_fn != method:
        raise UserError(f"{record_path}: args.score_fn {score_fn} contradicts the run's identity ({method}); {fix}")
    normalize = args.get("normalize", identity.get("normalize"))
    if normalize not in ("none", "train", "both"):
        raise UserError(f"{record_path}: args.normalize {str(normalize)[:40]!r} is not none, train or both; {fix}")
    args["score_fn"], args["normalize"] = score_fn, normalize


def check_arrays(record: dict, arrays: dict, results_dir: Path, fix: str) -> None:
    """Every array has the shape the record implies and its indices lie in the splits (a truncated, hand-edited or
    swapped .npy is refused with one line, never indexed)."""
    n_train, n_test = record["data"].get("n_train_split"), record["data"].get("n_test_split")
    top = arrays["top_k_influences_indices"]
    if top.ndim != 2:
        raise UserError(f"{results_dir}/top_k_influences_indices.npy has shape {top.shape}, not [n_test, k]; {fix}")
    rows = top.shape[0]
    expect = {"top_k_influences_values": top.shape, "top_k_opponents_values": top.shape, "top_k_opponents_indices": top.shape,
              "test_indices": (rows,), "test_pred": (rows,)}
    n_rows_train = arrays["train_indices"].shape[0] if arrays["train_indices"].ndim == 1 else -1
    for name in ("self_influence", "train_loss_last", "train_pred_last"):
        expect[name] = (n_rows_train,)
    for name in ("train_loss_per_ckpt", "train_margin_per_ckpt", "train_el2n_per_ckpt", "train_grad_sq_norm_per_ckpt"):
        expect[name] = (len(record.get("checkpoints", [])), n_rows_train)
    for name, shape in expect.items():
        if name in arrays and tuple(arrays[name].shape) != tuple(shape):
            raise UserError(f"{results_dir}/{name}.npy has shape {tuple(arrays[name].shape)}, not {tuple(shape)} as "
                            f"top_k_influences_indices.npy and the record imply; {fix}")
    for name in ("top_k_influences_values", "top_k_opponents_values"):
        if arrays[name].size and not np.isfinite(np.asarray(arrays[name])).all():
            raise UserError(f"{results_dir}/{name}.npy holds scores that are not finite (NaN or inf); {fix}")
    bounds = {"top_k_influences_indices": n_train, "top_k_opponents_indices": n_train, "train_indices": n_train,
              "test_indices": n_test}
    for name, n in bounds.items():
        a = np.asarray(arrays[name])
        if n is not None and a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= n):
            raise UserError(f"{results_dir}/{name}.npy holds indices outside the split's 0..{n - 1} "
                            f"(or is not integer); {fix}")


def explained_model(record: dict) -> str:
    """The model a run's lists explain, in words for titles and log lines."""
    model = record.get("model")
    if not isinstance(model, dict):
        return "the last checkpoint"
    return f"the model of epoch {model.get('epoch')} ({Path(str(model.get('path'))).name})"


def other_training_run(model_run: str | None, record: dict) -> str | None:
    """Why a model's output (evaluation, mispredictions) does not belong beside this TracIn run: the model comes from
    another training run than the run's checkpoints (retrained in place since); None when they match or are unknown."""
    runs = sorted({str(c.get("train_run")) for c in record.get("checkpoints", []) if c.get("train_run")})
    if not model_run or not runs or model_run in runs:
        return None
    return f"its model is of training run {model_run}, the TracIn checkpoints of run {', '.join(runs)} (retrained since?)"


def recorded_data_dir(record: dict) -> str:
    """The data folder a run was computed on, spelled as the run was given it when that still names the same folder
    (the split keys hash the paths as listed), else its absolute path."""
    given = record.get("args", {}).get("data_dir")
    if isinstance(given, str) and Path(given).resolve() == Path(record["data"]["data_dir"]):
        return given
    return record["data"]["data_dir"]


def check_data(record: dict, data_dir, results_dir) -> None:
    """Refuse to index results with data other than those they were computed on: another folder, or the same folder
    re-prepared, relabelled or edited since (each split's content key: paths, labels, sizes, mtimes)."""
    from lib.data_utils import data_identity

    data = record["data"]
    if Path(data_dir).resolve() != Path(data["data_dir"]):
        raise UserError(f"{results_dir} was computed on --data_dir {data['data_dir']}, not {data_dir}; "
                        f"pass --data_dir {data['data_dir']} (or rerun TracIn on this data)")
    differs = identity_mismatch(data, data_identity(data_dir))
    if differs:
        raise UserError(f"{data_dir} changed since TracIn ran on it ({differs}); rerun TracIn/efficient_tracin.py "
                        f"--output_dir {results_dir}")
