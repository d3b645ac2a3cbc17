"""Two stages with content identities (factors cached by what determines them, scores re-done from
the cache), one run per results folder, and one owner (TracIn/core/results.py) for reading results."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lib.cli import UserError
from lib.data_utils import list_split
from helpers import make_random_checkpoints, write_false_predictions
from TracIn import analyze_misprediction_influences, analyze_topk_results, mislabel_detection
from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job
from TracIn.core.results import ARRAYS, index_of, load_results


@pytest.fixture
def data(prepared, tmp_path):
    """A private copy of the prepared data (some tests edit it) and 3 random checkpoints."""
    d = tmp_path / "processed"
    shutil.copytree(prepared, d)
    ckpts = make_random_checkpoints(tmp_path / "ckpt", list_split(d, "train").class_names, n=3)
    return d, ckpts


def tracin(data, out, **settings):
    """A TracIn job through the library (TracInConfig, tracin_job), as efficient_tracin runs it."""
    d, ckpts = data
    return tracin_job(TracInConfig(**{"data_dir": str(d), "checkpoint_dir": str(ckpts[0].parent), "output_dir": str(out),
                                      "top_k": 5, "batch_size": 4, "num_workers": 0, "train_block": 7, "test_block": 4,
                                      **settings}))


def arrays(out) -> dict:
    return {n: np.load(out / f"{n}.npy") for n in ARRAYS if (out / f"{n}.npy").exists()}


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("change", [{"top_k": 2}, {"lr_weights": [1.0, 2.0, 3.0]}, {"test_subset": 3},
                                    {"train_subset": 9}, "one checkpoint fewer"])
def test_rescoring_runs_no_forward_pass_and_equals_a_fresh_run(data, tmp_path, change):
    first = tracin(data, tmp_path / "out")
    assert first["batches_computed"] == {"train": 5, "test": 2}
    if change == "one checkpoint fewer":
        change = {"checkpoints": list(map(str, data[1][1:]))}
    again = tracin(data, tmp_path / "out", **change)  # no --overwrite needed
    assert again["batches_computed"] == {"train": 0, "test": 0}
    tracin(data, tmp_path / "fresh", **change)
    a, b = arrays(tmp_path / "out"), arrays(tmp_path / "fresh")
    if "test_subset" in change or "train_subset" in change:
        # rows cached from the full run's batches differ from a subset's batches by float round-off only
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    else:
        assert_same(a, b)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["summary"]["batches_computed"] == {"train": 0, "test": 0}


def test_retrained_checkpoints_in_place_are_not_served_from_a_stale_cache(data, tmp_path):
    d, ckpts = data
    tracin(data, tmp_path / "out")
    old = arrays(tmp_path / "out")
    make_random_checkpoints(ckpts[0].parent, list_split(d, "train").class_names, n=3, lrs=(0.01, 0.004, 0.002), seed=7)
    summary = tracin(data, tmp_path / "out")
    assert summary["batches_computed"] == {"train": 5, "test": 2}
    tracin(data, tmp_path / "fresh")
    assert_same(arrays(tmp_path / "out"), arrays(tmp_path / "fresh"))
    assert not np.array_equal(old["top_k_influences_values"], arrays(tmp_path / "out")["top_k_influences_values"])


def test_changed_images_are_not_served_from_a_stale_cache(data, tmp_path):
    d, _ = data
    tracin(data, tmp_path / "out")
    path = list_split(d, "train").paths[0]
    Image.open(path).transpose(Image.FLIP_LEFT_RIGHT).save(path)  # same name and count, new content
    assert tracin(data, tmp_path / "out")["batches_computed"]["train"] == 5
    tracin(data, tmp_path / "fresh")
    assert_same(arrays(tmp_path / "out"), arrays(tmp_path / "fresh"))


def test_a_failed_run_leaves_the_previous_results_and_blocks_nothing(data, tmp_path):
    d, _ = data
    tracin(data, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    victim = list_split(d, "test").paths[1]
    good = open(victim, "rb").read()
    open(victim, "wb").write(good[:100])
    with pytest.raises(UserError, match="cannot read image"):
        tracin(data, tmp_path / "out", overwrite=True, top_k=3)
    with pytest.raises(UserError, match="--layers: no layer named 'nonexistent'"):
        tracin(data, tmp_path / "out", layers=["nonexistent"])
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert after == before
    open(victim, "wb").write(good)
    tracin(data, tmp_path / "out", top_k=3)  # the corrected command is not refused
    assert np.load(tmp_path / "out" / "top_k_influences_values.npy").shape == (6, 3)


def test_files_a_run_does_not_write_are_removed(data, tmp_path):
    d, _ = data
    tracin(data, tmp_path / "out")
    assert mislabel_detection.main(["--results_dir", str(tmp_path / "out"), "--data_dir", str(d),  # derived from this run
                                    "--checkpoint_dir", str(data[1][0].parent)]) == 0
    assert (tmp_path / "out" / "mislabel_candidates.csv").exists()
    tracin(data, tmp_path / "out", self_influence=False)
    assert not (tmp_path / "out" / "self_influence.npy").exists()
    assert not (tmp_path / "out" / "mislabel_candidates.csv").exists()
    with pytest.raises(UserError, match="--no_self_influence"):
        mislabel_detection.main(["--results_dir", str(tmp_path / "out"), "--data_dir", str(d), "--score", "self_influence",
                                 "--checkpoint_dir", str(data[1][0].parent)])


def test_self_influence_of_a_train_subset_is_looked_up_by_split_index(data, tmp_path):
    d, _ = data
    tracin(data, tmp_path / "out", train_subset=11)
    r = load_results(tmp_path / "out", data_dir=d)
    fp = tmp_path / "fp.csv"
    train_list = list_split(d, "train")
    ids = np.asarray(r["train_indices"])
    rows = [("train", int(j), train_list.paths[j], "cat", "dog", 0.9) for j in range(len(train_list.paths))]
    rows.append(("test", 0, list_split(d, "test").paths[0], "cat", "dog", 0.9))
    write_false_predictions(fp, pd.DataFrame(rows, columns=["split", "index", "path", "true_label", "pred_label", "confidence"]), d,
                            results_dir=tmp_path / "out")
    analyze_misprediction_influences.main(["--results_dir", str(tmp_path / "out"), "--data_dir", str(d),
                                           "--false_predictions", str(fp)])
    per = pd.read_csv(tmp_path / "out" / "misprediction_influence_analysis.csv").set_index("train_idx")
    si = dict(zip(ids.tolist(), np.asarray(r["self_influence"]).tolist()))
    for j, v in per.self_influence.items():
        if j in si:
            assert v == pytest.approx(si[j], rel=1e-6)
        else:
            assert np.isnan(v)  # not scored in this subset


def test_results_from_another_data_folder_are_refused(data, prepared, tmp_path):
    tracin(data, tmp_path / "out")
    for main, extra in ((mislabel_detection.main, ["--checkpoint_dir", str(data[1][0].parent)]),
                        (analyze_topk_results.main, ["--out_dir", str(tmp_path / "a")])):
        with pytest.raises(UserError, match="--data_dir"):
            main(["--results_dir", str(tmp_path / "out"), "--data_dir", str(prepared), *extra])
    with pytest.raises(UserError, match="no complete TracIn run"):
        load_results(tmp_path / "nothing_here")


def test_index_of_maps_split_indices_to_rows():
    ids = np.array([7, 2, 9, 4])
    np.testing.assert_array_equal(index_of(ids, [4, 7, 3, 9, 2, 100]), [3, 0, -1, 2, 1, -1])
    np.testing.assert_array_equal(index_of(np.array([], dtype=np.int64), [1]), [-1])
