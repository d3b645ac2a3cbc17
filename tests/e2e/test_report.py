"""The HTML results browser: built from a real run, opened from file:// in the system's headless
Chromium (Debian chromium + chromium-driver, driven by selenium). The browser tests are skipped with
their reason where Chromium is not installed; the build tests always run."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import prepare_data
from lib.data_utils import list_split, read_exclusions
from helpers import make_random_checkpoints, make_raw_tree, wait_for, write_false_predictions
from TracIn import efficient_tracin as et, mislabel_detection, report
from TracIn.core.results import load_results

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A private prepared data set (the review export relabels it), a TracIn run with its normalised
    twin and mislabel table, and a mispredictions table; one test image deleted after the run."""
    root = tmp_path_factory.mktemp("report")
    raw = make_raw_tree(root / "raw", per_class=8)
    data = root / "data"
    assert prepare_data.main(["--raw_dir", str(raw), "--out_dir", str(data), "--image_size", "32", "--test_fraction", "0.25",
                              "--val_fraction", "0", "--num_workers", "0"]) == 0
    names = list_split(data, "train").class_names
    make_random_checkpoints(root / "ckpt", names, n=2, lrs=(0.01, 0.004))
    common = ["--data_dir", str(data), "--checkpoint_dir", str(root / "ckpt"), "--top_k", "4", "--num_workers", "0"]
    assert et.main(common + ["--output_dir", str(root / "res"), "--score_fn", "tracin"]) == 0
    assert et.main(common + ["--output_dir", str(root / "res" / "raw"), "--score_fn", "tracin", "--normalize", "none",
                             "--cache_dir", str(root / "res" / "factors")]) == 0
    assert mislabel_detection.main(["--results_dir", str(root / "res"), "--data_dir", str(data),
                                    "--checkpoint_dir", str(root / "ckpt")]) == 0
    r = load_results(root / "res")
    test = list_split(data, "test")
    pred, ids = np.asarray(r["test_pred"]), np.asarray(r["test_indices"])
    wrong = ids[pred != test.labels[ids]]
    (root / "fp").mkdir()
    write_false_predictions(root / "fp" / "false_predictions.csv", pd.DataFrame({
        "split": "test", "index": wrong, "path": np.asarray(test.paths)[wrong], "true_label": np.asarray(names)[test.labels[wrong]],
        "pred_label": np.asarray(names)[pred[pred != test.labels[ids]]], "confidence": 0.5, "true_class_prob": 0.2}), data, results_dir=root / "res")
    gone = int(ids[-1])
    os.remove(test.paths[gone])  # an image file that went missing since the run
    args = ["--results_dir", str(root / "res"), "--data_dir", str(data), "--false_predictions", str(root / "fp"),
            "--eval_dir", str(root / "none"), "--show_k", "3", "--num_workers", "0"]
    assert report.main(args) == 0
    return {"root": root, "data": data, "res": root / "res", "raw": raw, "gone": gone, "args": args, "names": names}


def meta(path: Path) -> dict:
    text = (path / "data" / "meta.js").read_text()
    return json.loads(text[text.index("=") + 1:].strip().rstrip(";"))


def test_build_lists_notes_and_missing_optional_outputs(run, tmp_path):
    out = run["res"] / "report"
    m = meta(out)
    assert m["kinds"] == ["normalized", "raw"] and m["show_k"] == 3 and m["n_candidates"] == 18
    assert any("no longer matches the run" in n for n in m["notes"])  # the deleted file
    assert not (out / "thumbs" / "test" / f"{run['gone']}.jpg").exists()
    assert (out / "thumbs" / "test" / f"{m['test']['idx'][0]}.jpg").exists()
    r = load_results(run["res"])
    chunk = (out / "data" / "test_0.js").read_text()
    rows = json.loads(chunk[chunk.index(",[") + 1: chunk.rindex(")")])
    for rec in rows:
        row = r.test_row(rec["idx"])
        assert rec["lists"]["normalized"]["proponents"] == np.asarray(r["top_k_influences_indices"])[row, :3].tolist()
        assert rec["lists"]["normalized"]["opponents"] == np.asarray(r["top_k_opponents_indices"])[row, :3].tolist()
    # without the optional outputs the report still builds and says what is missing
    bare = tmp_path / "bare"
    shutil.copytree(run["res"], bare, ignore=shutil.ignore_patterns("raw", "mislabel", "mislabel_*", "report"))
    assert report.main(["--results_dir", str(bare), "--data_dir", str(run["data"]), "--false_predictions", str(tmp_path / "no"),
                        "--eval_dir", str(tmp_path / "no"), "--num_workers", "0"]) == 0
    notes = " ".join(meta(bare / "report")["notes"])
    for missing in ("only the normalized lists", "no mislabel table", "no mispredictions table"):
        assert missing in notes


def test_false_predictions_given_as_the_csv_path_keeps_the_mispredictions_view(run, tmp_path):
    args = list(run["args"])
    args[args.index("--false_predictions") + 1] = str(run["root"] / "fp" / "false_predictions.csv")
    assert report.main(args + ["--out_dir", str(tmp_path / "rep")]) == 0
    m = meta(tmp_path / "rep")
    assert m["mispredictions"] == meta(run["res"] / "report")["mispredictions"] > 0
    assert not any("no mispredictions table" in n for n in m["notes"])



def test_the_overview_says_where_the_model_was_selected(run, tmp_path):
    from lib.data_utils import data_identity

    (tmp_path / "ev").mkdir()
    args = list(run["args"])
    args[args.index("--eval_dir") + 1] = str(tmp_path / "ev")
    for selected, want in (("val", "val"), ("test", "test"), ("<img src=x onerror=1>", None)):
        (tmp_path / "ev" / "metrics_test.json").write_text(json.dumps({
            "accuracy": 0.5, "loss": 1.0, "n": 6, "model": "m.pth", "selected_on": selected, "selection_accuracy": 0.75,
            "model_record": json.loads((run["res"] / "run.json").read_text())["model"],  # the model the lists explain
            **data_identity(run["data"], images=False)}))
        assert report.main(args + ["--out_dir", str(tmp_path / "rep")]) == 0
        ev = meta(tmp_path / "rep")["evaluation"]
        assert ev["selected_on"] == want and ev["selection_accuracy"] == 0.75

def severe(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "thumbs/test/" not in e["message"]]


def idxs(driver, selector):
    return [int(x) for x in driver.execute_script(
        f"return [...document.querySelectorAll('{selector}')].map(e => e.dataset.idx)")]


def test_browser_views_filters_keys_and_review_export(run, browser, tmp_path):
    d, res = browser, run["res"]
    url = (res / "report" / "index.html").resolve().as_uri()
    r = load_results(res)
    raw_run = load_results(res / "raw")
    test_ids = np.asarray(r["test_indices"])
    t = int(test_ids[1])

    d.get(url + f"#test/{t}")
    wait_for(d, "document.querySelectorAll('.list .thumb').length == 12")
    for kind, run_ in (("normalized", r), ("raw", raw_run)):
        row = run_.test_row(t)
        assert idxs(d, f'.list[data-kind="{kind}"][data-role="prop"] .thumb') == np.asarray(run_["top_k_influences_indices"])[row, :3].tolist()
        assert idxs(d, f'.list[data-kind="{kind}"][data-role="opp"] .thumb') == np.asarray(run_["top_k_opponents_indices"])[row, :3].tolist()
    assert severe(d) == []

    # filters: class and mispredicted, against direct counts
    m = meta(res / "report")
    y, p = np.asarray(m["test"]["label"]), np.asarray(m["test"]["pred"])
    d.execute_script("const s = document.getElementById('f-class'); s.value = '1'; s.dispatchEvent(new Event('change', {bubbles: true}))")
    assert sorted(idxs(d, "#test-grid .thumb")) == sorted(test_ids[y == 1].tolist())
    d.execute_script("const s = document.getElementById('f-class'); s.value = ''; s.dispatchEvent(new Event('change', {bubbles: true}));"
                     "const f = document.getElementById('f-status'); f.value = 'wrong'; f.dispatchEvent(new Event('change', {bubbles: true}))")
    assert sorted(idxs(d, "#test-grid .thumb")) == sorted(test_ids[y != p].tolist())
    d.execute_script("const f = document.getElementById('f-status'); f.value = 'all'; f.dispatchEvent(new Event('change', {bubbles: true}))")

    # keyboard: next / previous image
    from selenium.webdriver.common.keys import Keys

    d.get(url + f"#test/{int(test_ids[0])}")
    wait_for(d, "document.querySelectorAll('.list .thumb').length == 12")
    d.find_element("tag name", "body").send_keys(Keys.ARROW_RIGHT)
    assert wait_for(d, f"location.hash == '#test/{int(test_ids[1])}'")
    d.find_element("tag name", "body").send_keys(Keys.ARROW_LEFT)
    assert wait_for(d, f"location.hash == '#test/{int(test_ids[0])}'")

    # the deleted test image shows a placeholder, not a broken image
    d.get(url + f"#test/{run['gone']}")
    assert wait_for(d, "document.querySelector('.detail .head img.missing') !== null")

    # review: drop one training image, relabel another; both survive a reload
    cand = pd.read_csv(res / "mislabel_candidates.csv").sort_values("rank")
    drop_idx, relabel_idx = int(cand.train_idx.iloc[0]), int(cand.train_idx.iloc[1])
    train = list_split(run["data"], "train")
    target = next(c for c in run["names"] if c != run["names"][train.labels[relabel_idx]])
    d.get(url + f"#train/{drop_idx}")
    wait_for(d, "document.querySelector('#train-sel .review') !== null")
    d.find_element("css selector", '#train-sel .review button[data-d="drop"]').click()
    d.get(url + f"#train/{relabel_idx}")
    wait_for(d, f"document.querySelector('#train-sel .review[data-idx=\"{relabel_idx}\"]') !== null")
    d.execute_script(f"const s = document.querySelector('#train-sel .review select'); s.value = '{target}';"
                     "s.dispatchEvent(new Event('change', {bubbles: true}))")
    d.refresh()
    wait_for(d, f"document.querySelector('#train-sel .review[data-idx=\"{relabel_idx}\"]') !== null")
    assert d.execute_script("return document.querySelector('#train-sel .review select').value") == target
    assert d.find_element("id", "review-count").text == "2 review decisions"
    # the training image's own view lists the test images it influences
    assert len(idxs(d, '.list[data-role="helps"] .thumb')) > 0
    assert severe(d) == []

    # the export is accepted by train.py --exclude and prepare_data.py --relabel
    csv = tmp_path / "review.csv"
    csv.write_text(d.execute_script("return reviewCsv()"))
    table = pd.read_csv(csv)
    assert table.decision.tolist() == (["drop", "relabel"] if drop_idx < relabel_idx else ["relabel", "drop"])
    assert read_exclusions(csv, train).tolist() == [drop_idx]
    before = pd.read_csv(run["data"] / "manifest.csv")
    source = before.set_index("path").loc[train.paths[relabel_idx], "source_path"]
    assert prepare_data.main(["--raw_dir", str(run["raw"]), "--out_dir", str(run["data"]), "--image_size", "32",
                              "--test_fraction", "0.25", "--val_fraction", "0", "--num_workers", "0", "--relabel", str(csv),
                              "--overwrite"]) == 0
    after = pd.read_csv(run["data"] / "manifest.csv").set_index("source_path")
    assert after.loc[source, "class_name"] == target

