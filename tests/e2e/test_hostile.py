"""Issue 18's hostile cases, each as a user meets it: nothing lost (every tool clears only what it marked as its
own), nothing stale (every reader compares the identity of what a result was computed from), nothing injected (the
report escapes every value it reads), and one error line instead of a traceback. Each test failed on the code
before this change."""
import errno
import os
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import clean_results
import demo_report
import gradCAM_evaluation
import prepare_data
import train
from lib.cli import UserError, os_error_message
from lib.data_utils import data_identity, list_split, read_exclusions
from helpers import (checksums, make_random_checkpoints, make_raw_tree, one_error_line, sh, wait_for,
                     write_false_predictions)
from TracIn import (analyze_misprediction_influences, analyze_topk_results, clean_and_retrain, counterfactual_check,
                    efficient_tracin as et, mislabel_detection, report)
from TracIn.core import factors
from TracIn.core.results import load_results, run_id
from TracIn.experiments import retraining

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Raw photos, a prepared data set, 2 random checkpoints, a TracIn run with its mislabel table."""
    root = tmp_path_factory.mktemp("hostile")
    raw = make_raw_tree(root / "raw", per_class=6)
    data = root / "data"
    assert prepare_data.main(["--raw_dir", str(raw), "--out_dir", str(data), "--image_size", "16", "--test_fraction", "0.25",
                              "--num_workers", "0"]) == 0
    ckpts = make_random_checkpoints(root / "ckpt", list_split(data, "train").class_names, n=2, image_size=16, lrs=(0.01, 0.004))
    w = {"root": root, "raw": raw, "data": data, "ckpt": ckpts[0].parent, "res": root / "res"}
    tracin(w, w["res"])
    assert mislabel_detection.main(["--results_dir", str(w["res"]), "--data_dir", str(data), "--checkpoint_dir", str(w["ckpt"])]) == 0
    return w


def tracin(w, out, data=None):
    return et.main(["--data_dir", str(data or w["data"]), "--checkpoint_dir", str(w["ckpt"]), "--output_dir", str(out),
                    "--top_k", "3", "--batch_size", "4", "--num_workers", "0"])


def own_copy(w, tmp_path):
    """A private copy of the world (data, checkpoints, results) that a test may re-prepare or corrupt."""
    c = dict(w)
    for key in ("data", "ckpt"):
        c[key] = tmp_path / key
        shutil.copytree(w[key], c[key], symlinks=True)
    c["res"] = tmp_path / "res"
    tracin(c, c["res"])
    return c


def report_args(w, out=None, fp=None):
    return ["--results_dir", str(w["res"]), "--data_dir", str(w["data"]), "--eval_dir", str(w["root"] / "none"),
            "--false_predictions", str(fp or w["root"] / "none"), "--num_workers", "0"] + (["--out_dir", str(out)] if out else [])


def fails(fn, argv, *needles):
    with pytest.raises(UserError) as e:
        fn(argv)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def bad_flag(parse, argv, capsys, needle):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


# ---------------------------------------------------------------- data loss
def test_report_into_a_folder_of_the_users_deletes_nothing(world, tmp_path):
    user = tmp_path / "repo"
    for name, text in (("data/README.md", "tracked"), ("data/raw/a.jpg", "photo"), ("figures/plot.png", "mine"),
                       ("gradcam/x.png", "mine"), ("index.html", "<p>my page</p>")):
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(text)
    before = checksums(user)
    # as the user ran it: from their folder, --out_dir .
    res = sh("-m", "TracIn.report", *report_args(world, out="."), cwd=user)
    one_error_line(res, "did not write")
    assert checksums(user) == before
    # the report's own folder is still replaced by a new build
    assert report.main(report_args(world, out=tmp_path / "rep")) == 0
    assert report.main(report_args(world, out=tmp_path / "rep")) == 0
    assert (tmp_path / "rep" / "index.html").exists()


def test_tracin_run_keeps_user_folders_named_like_derived_outputs(world, tmp_path):
    c = own_copy(world, tmp_path)
    assert mislabel_detection.main(["--results_dir", str(c["res"]), "--data_dir", str(c["data"]), "--checkpoint_dir", str(c["ckpt"])]) == 0
    for name in ("raw/photo.jpg", "analysis/notes.md", "report/mine.html", "normalized/x.txt", "counterfactual/y.txt",
                 "clean_and_retrain/z.txt"):
        (c["res"] / name).parent.mkdir(parents=True, exist_ok=True)
        (c["res"] / name).write_text(name)
    user = {n: (c["res"] / n).read_bytes() for n in ("raw/photo.jpg", "analysis/notes.md", "report/mine.html", "normalized/x.txt",
                                                     "counterfactual/y.txt", "clean_and_retrain/z.txt")}
    (c["res"] / "misprediction_summary.json").write_text("my own file of that name")  # never claimed by a tool
    assert tracin(c, c["res"]) == 0
    assert {n: (c["res"] / n).read_bytes() for n in user} == user
    assert (c["res"] / "misprediction_summary.json").read_text() == "my own file of that name"
    assert not (c["res"] / "mislabel_candidates.csv").exists()  # the derived table of the previous run went


def test_retraining_arms_never_clear_a_folder_they_did_not_mark(prepared, trained, tmp_path):
    user = tmp_path / "mine"
    (user / "none").mkdir(parents=True)
    (user / "none" / "keep.txt").write_text("mine")
    before = checksums(user)
    base = ["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--checkpoint_dir", str(trained / "ckpt"),
            "--out_dir", str(user), "--num_workers", "0"]
    fails(clean_and_retrain.main, base + ["--arch", "resnet18", "--epochs", "1"], "did not write")
    fails(counterfactual_check.main, base + ["--retrain", "full", "--epochs", "1", "--k", "1", "--seeds", "1"], "did not write")
    assert checksums(user) == before


def test_clean_results_removes_only_what_the_pipeline_marked(world, trained, tmp_path):
    repo = tmp_path / "repo"
    res, ckpt, fp, ev = repo / "TracIn/results", repo / "models/checkpoints", repo / "false_predictions", repo / "models/evaluation"
    shutil.copytree(world["res"], res, symlinks=True)  # the notebook links stay links, as `cp -a` keeps them
    shutil.copytree(trained / "ckpt", ckpt)
    for d in (res, fp, repo / "models"):
        d.mkdir(parents=True, exist_ok=True)
        (d / "README.md").write_text("tracked")
    (res / "my_notes").mkdir()
    (res / "my_notes" / "n.md").write_text("mine")
    (ckpt / "my_photo.jpg").write_bytes(b"mine")
    (repo / "models" / "my_weights.pth").write_bytes(b"keep")
    mine = ["TracIn/results/README.md", "TracIn/results/my_notes/n.md", "false_predictions/README.md", "models/README.md",
            "models/checkpoints/my_photo.jpg", "models/my_weights.pth"]
    assert clean_results.main(["--results_dir", str(res), "--checkpoint_dir", str(ckpt), "--false_predictions", str(fp),
                               "--eval_dir", str(ev)]) == 0
    left = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file() and p.name != ".written_by")
    assert left == sorted(mine)
    assert "clean_results.py" in (REPO / "Makefile").read_text()


# ---------------------------------------------------------------- stale or mixed results
def test_readers_refuse_results_of_a_re_prepared_folder(world, tmp_path):
    c = own_copy(world, tmp_path)
    d, res = c["data"], c["res"]
    test = list_split(d, "test")
    (tmp_path / "fp").mkdir()
    fp = write_false_predictions(tmp_path / "fp" / "false_predictions.csv", pd.DataFrame({"split": ["test"], "index": [0], "path": [test.paths[0]], "true_label": ["dog"],
                                               "pred_label": ["cat"], "confidence": [0.9]}), d)
    assert prepare_data.main(["--raw_dir", str(c["raw"]), "--out_dir", str(d), "--image_size", "16", "--test_fraction", "0.25",
                              "--num_workers", "0", "--seed", "1", "--overwrite"]) == 0
    assert len(list_split(d, "test").paths) == len(test.paths)  # same sizes and classes, another split
    common = ["--results_dir", str(res), "--data_dir", str(d)]
    fails(mislabel_detection.main, common + ["--checkpoint_dir", str(c["ckpt"])], "changed since")
    fails(analyze_topk_results.main, common + ["--out_dir", str(tmp_path / "a")], "changed since")
    fails(analyze_misprediction_influences.main, common + ["--false_predictions", str(fp)], "changed since")
    fails(report.main, report_args(c), "prepared again")
    fails(analyze_misprediction_influences.main, ["--results_dir", str(world["res"]), "--data_dir", str(world["data"]),
                                                   "--false_predictions", str(fp)], "other data")


def prepare_fresh(world, d):
    assert prepare_data.main(["--raw_dir", str(world["raw"]), "--out_dir", str(d), "--image_size", "16", "--test_fraction", "0.25",
                              "--num_workers", "0"]) == 0
    return d


def test_review_rows_are_matched_by_path_not_only_index(world, tmp_path):
    d = prepare_fresh(world, tmp_path / "data")
    train_list = list_split(d, "train")
    names = train_list.class_names
    j = int(np.flatnonzero(train_list.labels == 1)[0])  # first image of the middle class
    review = tmp_path / "review.csv"
    pd.DataFrame({"train_idx": [j], "path": [train_list.paths[j]], "decision": ["drop"], "new_class": [""]}).to_csv(review, index=False)
    assert read_exclusions(review, train_list).tolist() == [j]
    # relabel an image of the first class into the last one: every later index shifts down by one
    mover = train_list.paths[0]
    pd.DataFrame({"path": [mover], "new_class": [names[-1]]}).to_csv(tmp_path / "relabel.csv", index=False)
    assert prepare_data.main(["--raw_dir", str(world["raw"]), "--out_dir", str(d), "--image_size", "16", "--test_fraction", "0.25",
                              "--num_workers", "0", "--relabel", str(tmp_path / "relabel.csv"), "--overwrite"]) == 0
    new = list_split(d, "train")
    assert new.paths[j] != train_list.paths[j]
    with pytest.raises(UserError, match="changed since the review"):
        read_exclusions(review, new)


def test_training_dynamics_of_another_run_are_refused(prepared, trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained / "ckpt", other)
    z = dict(np.load(other / "training_dynamics.npz"))
    z["train_run"] = np.asarray("feedfacefeedface")  # another training run of the same data
    with open(other / "training_dynamics.npz", "wb") as f:
        np.savez(f, **z)
    base = ["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--out_dir", str(tmp_path / "o")]
    fails(mislabel_detection.main, base + ["--checkpoint_dir", str(other)], "feedfacefeedface")
    assert mislabel_detection.main(base + ["--checkpoint_dir", str(trained / "ckpt"), "--score", "aum"]) == 0


def test_report_never_reuses_thumbnails_or_gradcam_maps_of_other_data_or_models(world, tmp_path):
    c = own_copy(world, tmp_path)
    out = tmp_path / "rep"
    assert report.main(report_args(c, out=out)) == 0
    assert prepare_data.main(["--raw_dir", str(c["raw"]), "--out_dir", str(c["data"]), "--image_size", "16", "--test_fraction",
                              "0.25", "--num_workers", "0", "--seed", "1", "--overwrite"]) == 0
    assert tracin(c, c["res"]) == 0
    test = list_split(c["data"], "test")
    (tmp_path / "fp").mkdir()
    names = test.class_names  # classes of the data set: a table naming others is refused before Grad-CAM is looked at
    write_false_predictions(tmp_path / "fp" / "false_predictions.csv", pd.DataFrame({
        "split": ["test"], "index": [0], "path": [test.paths[0]], "true_label": [names[0]], "pred_label": [names[1]],
        "confidence": [0.9]}), c["data"], model_sha256="a" * 64, results_dir=c["res"])
    (tmp_path / "fp" / "gradcam").mkdir()
    shutil.copy(test.paths[0], tmp_path / "fp" / "gradcam" / "test_0.png")
    (tmp_path / "fp" / "gradcam" / "identity.json").write_text(json.dumps({"model_sha256": "b" * 64}))  # another model's maps
    assert report.main(report_args(c, out=out, fp=tmp_path / "fp")) == 0
    fresh = tmp_path / "fresh.jpg"
    assert report.write_thumbnail((test.paths[0], str(fresh)))
    assert (out / "thumbs" / "test" / "0.jpg").read_bytes() == fresh.read_bytes()
    m = json.loads((out / "data" / "meta.js").read_text().split("=", 1)[1].strip().rstrip(";"))
    assert any("Grad-CAM maps" in n and "skipped" in n for n in m["notes"])
    assert not (out / "gradcam").exists()


def test_analysis_folder_is_replaced_whole(world, tmp_path):
    args = ["--results_dir", str(world["res"]), "--data_dir", str(world["data"]), "--out_dir", str(tmp_path / "a")]
    assert analyze_topk_results.main(args) == 0
    (tmp_path / "a" / "panels" / "test_99999.png").write_bytes(b"a panel of an earlier run")
    assert analyze_topk_results.main(args) == 0
    assert not (tmp_path / "a" / "panels" / "test_99999.png").exists()
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["tracin_run"] == run_id(load_results(world["res"]).record)


def test_relabel_rows_that_disagree_or_are_empty_are_one_line(world, tmp_path):
    d = prepare_fresh(world, tmp_path / "data")
    p = list_split(d, "train").paths[0]
    base = ["--raw_dir", str(world["raw"]), "--out_dir", str(d), "--image_size", "16", "--test_fraction", "0.25",
            "--num_workers", "0", "--overwrite", "--relabel", str(tmp_path / "r.csv")]
    before = checksums(d)
    pd.DataFrame({"path": [p, p], "new_class": ["cat", "spider"]}).to_csv(tmp_path / "r.csv", index=False)
    fails(prepare_data.main, base, "listed twice")
    pd.DataFrame({"path": [p], "new_class": [None]}).to_csv(tmp_path / "r.csv", index=False)
    fails(prepare_data.main, base, "empty")
    assert checksums(d) == before


@pytest.mark.parametrize("parse, argv, needle", [
    (prepare_data.parse_args, ["--label_noise", "nan"], "finite"),
    (prepare_data.parse_args, ["--test_fraction", "nan"], "finite"),
    (train.parse_args, ["--learning_rate", "nan"], "finite"),
    (train.parse_args, ["--weight_decay", "-1"], "out of range"),
    (train.parse_args, ["--batch_size", "1"], "out of range"),
    (train.parse_args, ["--dataset_tag", "../../../x"], "not a plain name"),
    (clean_and_retrain.parse_args, ["--fraction", "nan"], "finite"),
    (et.parse_args, ["--lr_weights", "inf"], "finite"),
    (prepare_data.parse_args, ["--image_size", "100000"], "<= 4096"),   # was OOM-killed with no line
    (train.parse_args, ["--image_size", "100000"], "<= 4096"),
    (prepare_data.parse_args, ["--val_fraction", "0.9"], "<= 0.5"),
])
def test_numeric_and_name_flags_reject_nan_inf_and_paths(parse, argv, needle, capsys):
    bad_flag(parse, argv, capsys, needle)


# ---------------------------------------------------------------- injection
CRAFT = '<img src=x onerror="window.__pwned=1">'


def test_report_escapes_crafted_values_in_every_file_it_reads(world, tmp_path, browser):
    c = own_copy(world, tmp_path)
    res = c["res"]
    rec = json.loads((res / "run.json").read_text())
    rec["layers"] = [CRAFT]
    # args.score_fn / args.normalize: refused by every reader (test_a_crafted_method_name_or_array_...)
    rec["checkpoints"][0]["path"] = CRAFT
    rec["checkpoints"][0]["epoch"] = CRAFT
    rec["summary"]["seconds_total"] = CRAFT
    (res / "run.json").write_text(json.dumps(rec))
    rid = run_id(rec)
    assert mislabel_detection.main(["--results_dir", str(res), "--data_dir", str(c["data"]), "--checkpoint_dir", str(c["ckpt"])]) == 0
    cand = pd.read_csv(res / "mislabel_candidates.csv").rename(columns={"loss_last": CRAFT})
    cand.to_csv(res / "mislabel_candidates.csv", index=False)
    (res / "mislabel" / "mislabel_detection.json").write_text(json.dumps({
        "tracin_run": rid, "score": CRAFT, "n_mislabeled": CRAFT, "metrics": {CRAFT: {"roc_auc": CRAFT, "recall_at_5pct": 0.5}}}))
    (res / "counterfactual" / CRAFT.replace("/", "_")).mkdir(parents=True)
    (res / "counterfactual" / CRAFT.replace("/", "_") / "counterfactual.json").write_text(json.dumps({
        "tracin_run": rid, "retrain": CRAFT, "seeds": CRAFT, "group": [1, 2],
        "summary": {CRAFT: {"removed": CRAFT, "d_loss_mean": CRAFT, "d_loss_std": 1, "d_flips_mean": 0, "beats_random": CRAFT}}}))
    (res / "lds").mkdir()
    (res / "lds" / "lds.json").write_text(json.dumps({"tracin_run": rid, "retrain": CRAFT, "reported_subsets": CRAFT, "n_test": 3,
                                                      "methods": {CRAFT: {"lds": CRAFT, "ci95": [CRAFT, 0.5], "damping": CRAFT}}}))
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "metrics_test.json").write_text(json.dumps({"accuracy": CRAFT, "loss": 1.0, "n": CRAFT, "model": CRAFT,
                                                                   "model_record": rec["model"],
                                                                   **data_identity(c["data"], images=False)}))
    test = list_split(c["data"], "test")
    (tmp_path / "fp").mkdir()
    write_false_predictions(tmp_path / "fp" / "false_predictions.csv", pd.DataFrame({
        "split": ["test"], "index": [0], "path": [test.paths[0]], "true_label": [CRAFT], "pred_label": [CRAFT], "confidence": [0.9]}),
        c["data"], results_dir=res)
    args = report_args(c, out=tmp_path / "rep", fp=tmp_path / "fp")
    args[args.index("--eval_dir") + 1] = str(tmp_path / "ev")
    assert report.main(args) == 0
    url = (tmp_path / "rep" / "index.html").as_uri()
    train0 = json.loads((tmp_path / "rep" / "data" / "meta.js").read_text().split("=", 1)[1].strip().rstrip(";"))["train_order"][0]
    seen = ""
    for view in ("", "#test", "#test/0", "#train", f"#train/{train0}", "#mis"):
        browser.get(url + view)
        browser.refresh()
        wait_for(browser, "!document.getElementById('main').innerText.startsWith('Loading')")
        time.sleep(0.3)  # chunks load on demand
        seen += browser.execute_script("return document.body.innerText")
        assert browser.execute_script("return window.__pwned") is None, view
        assert browser.execute_script("return document.querySelectorAll('img[onerror], script:not([src])').length") == 0, view
    assert CRAFT in seen  # shown as text, not run
    assert seen.count(CRAFT) >= 6  # the run, evaluation, mislabel, counterfactual, LDS and misprediction values reached the page


def test_a_dataset_tag_never_leaves_models_dir(prepared, tmp_path):
    res = sh("train.py", "--data_dir", prepared, "--dataset_tag", "../../../x", "--models_dir", tmp_path / "m", "--epochs", "1")
    assert res.returncode == 2 and "not a plain name" in res.stderr and "Traceback" not in res.stderr
    assert not list(tmp_path.parent.glob("x*"))


# ---------------------------------------------------------------- one line instead of a traceback
def test_corrupt_or_truncated_result_files_are_one_line(world, tmp_path):
    c = own_copy(world, tmp_path)
    res, d = c["res"], c["data"]
    good = (res / "run.json").read_bytes()
    (res / "run.json").write_text("{ not json")
    fails(mislabel_detection.main, ["--results_dir", str(res), "--data_dir", str(d), "--checkpoint_dir", str(c["ckpt"])], "run.json")
    fails(report.main, report_args(c), "run.json")
    assert tracin(c, res) == 0  # a new run into a folder whose record is corrupt simply replaces it
    assert json.loads((res / "run.json").read_text())["identity"] == json.loads(good)["identity"]
    arr = res / "top_k_influences_values.npy"
    arr.write_bytes(arr.read_bytes()[:100])
    fails(analyze_topk_results.main, ["--results_dir", str(res), "--data_dir", str(d), "--out_dir", str(tmp_path / "a")],
          "top_k_influences_values.npy")
    assert tracin(c, res) == 0
    cand = res / "mislabel_candidates.csv"
    assert mislabel_detection.main(["--results_dir", str(res), "--data_dir", str(d), "--checkpoint_dir", str(c["ckpt"])]) == 0
    table = pd.read_csv(cand)
    table["loss_last"] = table["loss_last"].astype(object)
    table.loc[0, "loss_last"] = "abc"
    table.to_csv(cand, index=False)
    fails(report.main, report_args(c, out=tmp_path / "rep"), "loss_last", "abc")


def test_a_table_cut_short_is_refused_not_read_as_a_shorter_one(world, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(world["res"], res, symlinks=True)
    table = res / "mislabel" / "mislabel_candidates.csv"
    table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])  # a copy or a disk that stopped mid-row
    fails(mislabel_detection.load, res, "mislabel_candidates.csv", "cut short")
    fails(lambda r: mislabel_detection.load(r, notes=[]), res, "cut short")  # corrupt: refused whatever the caller keeps


def test_corrupt_cache_and_a_failed_allocation_are_recomputed(world, tmp_path, monkeypatch):
    c = own_copy(world, tmp_path)
    res = c["res"]
    before = {n: np.load(res / f"{n}.npy") for n in ("top_k_influences_values", "top_k_influences_indices", "self_influence")}
    metas = sorted((res / "factors").rglob("meta.json"))
    metas[0].write_text("{ corrupt")
    a_file = sorted(metas[1].parent.glob("A_*.npy"))[0]
    metas[1].unlink()            # as a full disk leaves it: no meta.json, a 0-byte array
    a_file.write_bytes(b"")
    assert tracin(c, res) == 0
    for n, v in before.items():
        np.testing.assert_array_equal(np.load(res / f"{n}.npy"), v, err_msg=n)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(factors.os, "posix_fallocate", full)
    with pytest.raises(OSError) as e:
        tracin(c, tmp_path / "new")
    assert str(tmp_path / "new" / "factors") in e.value.filename
    assert str(tmp_path / "new" / "factors") in os_error_message(e.value)


def test_train_refuses_bad_exclusions_and_settings_before_touching_anything(trained, prepared, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt)
    before = checksums(ckpt)
    train_list = list_split(prepared, "train")
    base = ["--data_dir", str(prepared), "--checkpoint_dir", str(ckpt), "--models_dir", str(tmp_path / "m"), "--arch", "resnet18",
            "--epochs", "2", "--batch_size", "4", "--weights", "none", "--num_workers", "0", "--no-hflip",
            "--save_checkpoints_every", "1"]
    for keep in (0, 1):
        pd.DataFrame({"train_idx": range(len(train_list.paths) - keep)}).to_csv(tmp_path / "x.csv", index=False)
        fails(train.main, base + ["--overwrite", "--exclude", str(tmp_path / "x.csv")], f"leaves {keep} of")
    fails(train.main, base + ["--resume", "--learning_rate", "0.5"], "--learning_rate 0.5", "differ")
    fails(train.main, base + ["--resume", "--seed", "3"], "--seed 3")
    assert checksums(ckpt) == before
    d = tmp_path / "data"
    shutil.copytree(prepared, d)
    (d / "prepare_args.json").write_text("{ corrupt")
    fails(train.main, ["--data_dir", str(d), "--checkpoint_dir", str(tmp_path / "c2"), "--epochs", "1"], "prepare_args.json")


def test_retrains_leave_out_what_the_original_run_left_out(prepared, trained, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", ckpt)
    saved = json.loads((ckpt / "train_args.json").read_text())
    train_list = list_split(prepared, "train")
    saved["excluded"] = {"train_idx": [3], "path": [train_list.paths[3]]}
    (ckpt / "train_args.json").write_text(json.dumps(saved))
    assert retraining.original_exclusions(ckpt, train_list).tolist() == [3]
    drops = {}

    def fake_train_without(arm_dir, settings, data_dir, drop, listing, num_workers, device, tag, owner, tool):
        drops[arm_dir.name] = drop.tolist()
        return trained / "ckpt" / "finetune_epoch_2.pth"

    monkeypatch.setattr(retraining, "train_without", fake_train_without)
    assert clean_and_retrain.main(["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--checkpoint_dir", str(ckpt),
                                   "--out_dir", str(tmp_path / "cr"), "--random_seeds", "2", "--fraction", "0.2"]) == 0
    assert len(drops) == 5 and all(3 in d for d in drops.values())
    assert drops["none"] == [3] and all(len(d) == 1 + round(0.2 * 18) for k, d in drops.items() if k != "none")
    saved["data_train_key"] = "0" * 16  # the data changed since the original run: its indices name other images
    (ckpt / "train_args.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="changed since the run"):
        retraining.original_exclusions(ckpt, train_list)


def test_empty_or_foreign_false_predictions_are_one_line(world, trained, prepared, tmp_path):
    model = trained / "ckpt" / "finetune_epoch_2.pth"
    from lib.files import file_sha256

    (tmp_path / "fp.csv").write_text("")
    write_false_predictions(tmp_path / "f2.csv", pd.DataFrame({"a": [1], "b": [2]}), prepared, file_sha256(model))
    (tmp_path / "fp.json").write_text((tmp_path / "f2.json").read_text())
    for csv, needle in ((tmp_path / "fp.csv", "cannot read"), (tmp_path / "f2.csv", "lacks the column")):
        fails(gradCAM_evaluation.main, ["--model", str(model), "--data_dir", str(prepared), "--false_predictions", str(csv),
                                        "--results_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "g"),
                                        "--device", "cpu"], needle)
        fails(analyze_misprediction_influences.main, ["--results_dir", str(trained / "res"), "--data_dir", str(prepared),
                                                      "--false_predictions", str(csv), "--out_dir", str(tmp_path / "o")], needle)


def test_symlinks_where_results_go_never_leave_a_half_replaced_run(world, tmp_path):
    c = own_copy(world, tmp_path)
    res = c["res"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.md").write_text("mine")
    (res / "analysis").symlink_to(elsewhere, target_is_directory=True)
    assert tracin(c, res) == 0  # a linked folder under a derived name is neither followed nor removed
    assert (elsewhere / "notes.md").read_text() == "mine" and (res / "analysis").is_symlink()
    (res / "self_influence.npy").unlink()
    (res / "self_influence.npy").symlink_to(elsewhere, target_is_directory=True)
    before = checksums(res)
    fails(et.main, ["--data_dir", str(c["data"]), "--checkpoint_dir", str(c["ckpt"]), "--output_dir", str(res), "--top_k", "2",
                    "--num_workers", "0"], "self_influence.npy", "nothing was changed")
    assert checksums(res) == before


def test_a_folder_that_is_both_cache_and_output_is_refused(world, tmp_path):
    for cache in (tmp_path / "out", tmp_path):
        fails(et.main, ["--data_dir", str(world["data"]), "--checkpoint_dir", str(world["ckpt"]), "--output_dir", str(tmp_path / "out"),
                        "--cache_dir", str(cache), "--num_workers", "0"], "not both")


def test_a_results_file_name_the_previous_run_did_not_write_is_left_alone(world, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "self_influence.npy").write_bytes(b"my own array")  # no run recorded it
    assert et.main(["--data_dir", str(world["data"]), "--checkpoint_dir", str(world["ckpt"]), "--output_dir", str(out),
                    "--top_k", "2", "--num_workers", "0", "--no_self_influence"]) == 0
    assert (out / "self_influence.npy").read_bytes() == b"my own array"
    assert "self_influence.npy" not in json.loads((out / "run.json").read_text())["files"]


def test_a_crafted_method_name_or_array_in_a_run_is_refused_by_every_reader(world, tmp_path):
    """A run.json whose args.score_fn is markup (it reached the results page unescaped) and .npy files of the wrong
    shape or with indices outside the split: one line from the readers, nothing indexed or rendered."""
    c = own_copy(world, tmp_path)
    res, d = c["res"], c["data"]
    record = json.loads((res / "run.json").read_text())
    for key, value in (("score_fn", '<img src=x onerror="document.title=1">'), ("normalize", "<b>x</b>")):
        crafted = json.loads(json.dumps(record))
        crafted["args"][key] = value
        (res / "run.json").write_text(json.dumps(crafted))
        fails(report.main, report_args(c, out=tmp_path / "rep"), f"args.{key}")
        fails(analyze_topk_results.main, ["--results_dir", str(res), "--data_dir", str(d)], f"args.{key}")
    (res / "run.json").write_text(json.dumps(record))
    idx = res / "top_k_influences_indices.npy"
    good = np.load(idx)
    for bad, needle in ((good + 10_000, "outside"), (good[:, :1], "shape"), (good.ravel(), "shape"), (-good - 1, "outside")):
        np.save(idx, bad)
        fails(analyze_topk_results.main, ["--results_dir", str(res), "--data_dir", str(d)], "top_k_influences_indices", needle)
        fails(report.main, report_args(c, out=tmp_path / "rep"), "top_k_influences_indices", needle)
    np.save(idx, good)
    vals = res / "top_k_influences_values.npy"
    good_vals = np.load(vals)
    np.save(vals, np.where(np.arange(good_vals.size).reshape(good_vals.shape) == 0, np.nan, good_vals).astype(good_vals.dtype))
    fails(analyze_topk_results.main, ["--results_dir", str(res), "--data_dir", str(d)], "not finite")  # was a traceback
    np.save(vals, good_vals)
    np.save(res / "test_indices.npy", np.load(res / "test_indices.npy")[:-1])
    fails(mislabel_detection.main, ["--results_dir", str(res), "--data_dir", str(d), "--checkpoint_dir", str(c["ckpt"])],
          "test_indices", "shape")
    assert not (tmp_path / "rep").exists() and not (res / "analysis").exists()


def test_demo_report_on_a_run_without_injected_noise_and_a_zero_byte_checkpoint_are_one_line(world, tmp_path):
    c = own_copy(world, tmp_path)
    assert mislabel_detection.main(["--results_dir", str(c["res"]), "--data_dir", str(c["data"]), "--checkpoint_dir", str(c["ckpt"])]) == 0
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "metrics_test.json").write_text(json.dumps({"accuracy": 0.5, "n": 6, "model": "m"}))
    fails(demo_report.main, ["--results_dir", str(c["res"]), "--eval_dir", str(ev)], "misprediction")  # not KeyError: 'metrics'
    (tmp_path / "zero.pth").write_bytes(b"")
    res = sh("evaluate.py", "--model", tmp_path / "zero.pth", "--data_dir", c["data"], "--out_dir", tmp_path / "e")
    one_error_line(res, "zero.pth")


def test_a_mispredictions_table_must_be_the_one_its_record_names_and_of_this_data(world, tmp_path):
    c = own_copy(world, tmp_path)
    test = list_split(c["data"], "test")
    names = test.class_names
    (tmp_path / "fp").mkdir()
    csv = tmp_path / "fp" / "false_predictions.csv"
    args = ["--results_dir", str(c["res"]), "--data_dir", str(c["data"]), "--false_predictions", str(csv),
            "--out_dir", str(tmp_path / "mis")]
    row = {"split": ["test"], "index": [0], "path": [test.paths[0]], "true_label": [names[0]], "pred_label": [names[1]],
           "confidence": [0.9]}
    for change, needle in (({"true_label": ["unicorn"]}, "not a class"), ({"path": ["/elsewhere/x.jpg"]}, "is not that image"),
                           ({"index": [10_000]}, "is not that image")):
        write_false_predictions(csv, pd.DataFrame({**row, **change}), c["data"], results_dir=c["res"])
        fails(analyze_misprediction_influences.main, args, needle)
    write_false_predictions(csv, pd.DataFrame(row), c["data"], results_dir=c["res"])
    assert analyze_misprediction_influences.main(args) == 0
    csv.write_text(csv.read_text().replace(names[1], names[2]))  # edited after its record was written
    fails(analyze_misprediction_influences.main, args, "is not the table")


def test_an_unprojected_conv_curvature_is_refused_before_any_work(world, tmp_path):
    """--proj_dim 0 on a conv block with the K-FAC default tried to allocate terabytes (RuntimeError)."""
    res = sh("-m", "TracIn.efficient_tracin", "--data_dir", world["data"], "--checkpoint_dir", world["ckpt"], "--output_dir",
             tmp_path / "r", "--proj_dim", "0", "--layers", "layer4", "--top_k", "2", "--num_workers", "0")
    one_error_line(res, "--proj_dim 16", "GiB")
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # checked before any output


def test_a_garbage_or_truncated_manifest_is_refused_with_one_line(world, tmp_path):
    c = own_copy(world, tmp_path)
    manifest = c["data"] / "manifest.csv"
    good = manifest.read_text()
    for bad, needle in (("\x00\x01garbage", "manifest.csv"), ("\n".join(good.splitlines()[:-1]) + "\n", "does not describe")):
        manifest.write_text(bad)
        res = sh("-m", "TracIn.efficient_tracin", "--data_dir", c["data"], "--checkpoint_dir", c["ckpt"], "--output_dir",
                 tmp_path / "r", "--top_k", "2", "--num_workers", "0")
        one_error_line(res, needle)
    manifest.write_text(good)
    os.remove(manifest)  # no manifest at all: an image folder prepared by other means is scored as before
    assert tracin(c, tmp_path / "r2") == 0


def test_a_run_record_of_wrong_types_or_without_its_method_is_read_through_one_typed_reader(world, tmp_path):
    """run.json's fields are checked once where it is loaded (results.check_record): a null summary or a split size as
    text is one line from every reader, not a traceback; a record whose args were emptied is named by the method its
    identity says (not guessed as tracin), and args that contradict the identity are refused."""
    c = own_copy(world, tmp_path)
    res, d = c["res"], c["data"]
    record = json.loads((res / "run.json").read_text())
    for path, value, needle in ((("summary",), None, "summary"), (("data", "n_train_split"), "18", "data.n_train_split"),
                                (("checkpoints",), {}, "checkpoints"), (("data", "class_names"), None, "data.class_names"),
                                (("checkpoints", 0, "lr"), "0.1", "checkpoints[0].lr"), (("files",), 3, "files"),
                                (("args", "member_sizes"), [5], "args.member_sizes")):
        crafted = json.loads(json.dumps(record))
        target = crafted
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        (res / "run.json").write_text(json.dumps(crafted))
        one_error_line(sh("-m", "TracIn.report", *report_args(c, out=tmp_path / "rep")), "run.json", needle)
        fails(mislabel_detection.main, ["--results_dir", str(res), "--data_dir", str(d), "--checkpoint_dir", str(c["ckpt"])],
              "run.json", needle)
    assert not (tmp_path / "rep").exists()
    # an influence_last run whose args were emptied: its identity names the method
    last = tmp_path / "last"
    assert et.main(["--data_dir", str(d), "--checkpoint_dir", str(c["ckpt"]), "--output_dir", str(last), "--top_k", "3",
                    "--cache_dir", str(res / "factors"), "--score_fn", "influence_last", "--num_workers", "0"]) == 0
    record = json.loads((last / "run.json").read_text())
    (last / "run.json").write_text(json.dumps({**record, "args": {}}))
    assert load_results(last).record["args"]["score_fn"] == "influence_last"
    assert report.main(["--results_dir", str(last), "--data_dir", str(d), "--eval_dir", str(tmp_path / "none"),
                        "--false_predictions", str(tmp_path / "none"), "--num_workers", "0"]) == 0
    meta = (last / "report" / "data" / "meta.js").read_text()
    meta = json.loads(meta[meta.index("=") + 1:].strip().rstrip(";"))
    assert meta["run"]["score_fn"] == "influence_last" and meta["kinds"][0] == "influence_last"  # was "tracin", "raw"
    (last / "run.json").write_text(json.dumps({**record, "args": {**record["args"], "score_fn": "tracin"}}))
    fails(report.main, ["--results_dir", str(last), "--data_dir", str(d)], "args.score_fn", "contradicts")


def test_a_file_that_is_no_checkpoint_is_one_line_without_torchs_hint(world, tmp_path):
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    res = sh("evaluate.py", "--model", photo, "--data_dir", world["data"], "--out_dir", tmp_path / "e")
    one_error_line(res, "photo.jpg: it is not a checkpoint written by train.py")
    assert "weights_only" not in res.stderr
