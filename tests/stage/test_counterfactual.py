"""The counterfactual removal check end to end on the tiny data: its lists are efficient_tracin's,
every arm really retrains without its removal set, and an arm that removes nothing changes nothing."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from lib.cli import UserError
from lib.devices import resolve_device
from TracIn import counterfactual_check as cc, efficient_tracin as et
from TracIn.core.results import load_results
from TracIn.core.run import InfluenceRun
from TracIn.experiments import retraining


def run_check(prepared, trained, out, *extra):
    return cc.main(["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--out_dir", str(out),
                    "--num_workers", "0", "--n_test", "3", "--k", "2", *extra])


def test_full_retrain_end_to_end_and_nothing_removed_changes_nothing(prepared, trained, tmp_path, monkeypatch):
    # knn is made to remove nothing: its arms must equal the nothing-removed arm of the same seed, bit for bit
    monkeypatch.setattr(cc, "knn_lists", lambda run_factors, group, k: np.zeros((len(group), 0), dtype=np.int64))
    out = tmp_path / "cf"
    assert run_check(prepared, trained, out, "--methods", "tracin", "knn", "random", "--seeds", "2", "--epochs", "1") == 0
    res = json.loads((out / "counterfactual.json").read_text())
    assert res["retrain"] == "full" and res["settings"]["epochs"] == 1 and len(res["group"]) == 3
    assert len(res["arms"]) == 2 * 4  # (none + 3 methods) x 2 seeds
    assert sorted({a["train_seed"] for a in res["arms"]}) == [0, 1]  # the original seed 0, then 1

    # the tracin lists are efficient_tracin's top proponents of the group images
    r = load_results(trained / "res")
    props = np.asarray(r["top_k_influences_indices"])
    for g, row in zip(res["group"], res["lists"]["tracin"]):
        assert row == props[r.test_row(g)][:2].tolist()

    for a in res["arms"]:  # each arm retrained with exactly its removal set
        arm = out / "arms" / f"{a['method']}-k{a['k']}-seed{a['train_seed']}"
        excluded = pd.read_csv(arm / "exclude.csv")
        assert len(excluded) == a["removed"]
        assert np.load(arm / "test_logits.npy").shape == (6, 3)
        if a["method"] == "tracin":
            assert set(excluded.train_idx) == set(np.asarray(res["lists"]["tracin"])[:, :2].ravel())
    assert all(a["removed"] == 0 for a in res["arms"] if a["method"] in ("none", "knn"))
    assert all(a["removed"] > 0 for a in res["arms"] if a["method"] in ("tracin", "random"))

    s = res["summary"]
    assert s["knn@2"]["d_loss_per_seed"] == [0.0, 0.0] and s["knn@2"]["d_flips_mean"] == 0.0
    assert s["knn@2"]["d_margin_per_seed"] == [0.0, 0.0] and s["knn@2"]["beats_random"] is False
    # removing images does change the retrained model
    assert any(abs(v) > 0 for v in s["tracin@2"]["d_loss_per_seed"] + s["random@2"]["d_loss_per_seed"])


def test_head_retrain_and_normalized_lists(prepared, trained, tmp_path):
    out = tmp_path / "head"
    assert run_check(prepared, trained, out, "--retrain", "head", "--methods", "tracin_normalized", "knn", "random") == 0
    res = json.loads((out / "counterfactual.json").read_text())
    assert len(res["arms"]) == 3 * 4
    # normalised lists are efficient_tracin --normalize train's
    assert et.main(["--data_dir", str(prepared), "--checkpoint_dir", str(trained / "ckpt"), "--output_dir", str(tmp_path / "n"),
                    "--top_k", "3", "--num_workers", "0", "--score_fn", "tracin", "--normalize", "train",
                    "--all_checkpoints"]) == 0  # the checkpoints of trained/res
    r = load_results(tmp_path / "n")
    props = np.asarray(r["top_k_influences_indices"])
    for g, row in zip(res["group"], res["lists"]["tracin_normalized"]):
        assert row == props[r.test_row(g)][:2].tolist()
    # head retraining is seeded: the same seed and data give the same weights; another seed does not
    run_factors = InfluenceRun.from_results(str(trained / "res"), str(prepared), resolve_device("cpu"), 0)
    x, y = run_factors.features("train"), run_factors.train_list.labels
    keep = np.ones(len(y), dtype=bool)
    w = [retraining.retrain_head(x, y, keep, res["settings"], seed) for seed in (0, 0, 1)]
    assert np.array_equal(w[0], w[1]) and not np.array_equal(w[0], w[2])


def test_bad_input_is_one_line(prepared, trained, tmp_path):
    shutil.copytree(trained / "ckpt", tmp_path / "ck2")
    (tmp_path / "ck2" / "train_args.json").unlink()
    with pytest.raises(UserError, match="do not record how they were trained"):
        run_check(prepared, trained, tmp_path / "o", "--checkpoint_dir", str(tmp_path / "ck2"))
    with pytest.raises(UserError, match="the test split has 6 images"):
        run_check(prepared, trained, tmp_path / "o", "--test_ids", "2", "60")
    with pytest.raises(UserError, match="lower --k"):
        run_check(prepared, trained, tmp_path / "o", "--retrain", "head", "--k", "50")
    with pytest.raises(UserError, match="--retrain head keeps"):
        run_check(prepared, trained, tmp_path / "o", "--retrain", "head", "--epochs", "1")
    assert not (tmp_path / "o" / "counterfactual.json").exists()


def test_lists_from_a_record_of_an_older_version(prepared, trained, tmp_path):
    """A run.json written before --score_fn existed (normalize train, no score_fn): the check still ranks every method."""
    res = tmp_path / "res"
    shutil.copytree(trained / "res", res)
    record = json.loads((res / "run.json").read_text())
    record["args"].pop("score_fn", None)
    record["args"].pop("damping", None)
    record["args"]["normalize"] = "train"
    (res / "run.json").write_text(json.dumps(record))
    run_factors = InfluenceRun.from_results(str(res), str(prepared), resolve_device("cpu"), 0)
    group = np.arange(3)
    for score_fn, normalize in (("tracin", "none"), ("tracin", "train"), ("influence_last", "none")):
        lists = run_factors.recompute_proponents(group, 2, score_fn=score_fn, normalize=normalize)
        assert lists.shape == (3, 2) and (lists >= 0).all()
