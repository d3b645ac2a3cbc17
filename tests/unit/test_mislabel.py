"""Mislabel detectors against direct NumPy computations, training dynamics, noise kinds, acting on a
reviewed list (--exclude / --relabel) and clean-and-retrain end to end."""
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import prepare_data
import train
from lib.cli import UserError
from lib.data_utils import list_split
from lib.prediction import logit_figures
from lib.training_dynamics import load_dynamics
from helpers import make_random_checkpoints, make_raw_tree
from TracIn import clean_and_retrain, efficient_tracin as et
from TracIn.core.results import load_results
from TracIn.detectors import average_precision, detector_scores, forgetting_events


class FakeResults(dict):
    """What detector_scores reads from a TracInResults: named arrays."""


def test_detectors_against_direct_numpy():
    rng = np.random.default_rng(0)
    n_ckpt, n, C, E = 3, 7, 4, 5
    logits = rng.normal(size=(n_ckpt, n, C))
    labels = rng.integers(0, C, n)
    loss, margin, el2n = logit_figures(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    onehot = np.eye(C)[labels]
    np.testing.assert_allclose(loss, -np.log(p[:, np.arange(n), labels]), rtol=1e-5)
    other = np.where(onehot.astype(bool), -np.inf, logits).max(-1)
    np.testing.assert_allclose(margin, logits[:, np.arange(n), labels] - other, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(el2n, np.linalg.norm(p - onehot, axis=-1), rtol=1e-5)

    norms = rng.gamma(1.0, size=(n_ckpt, n))
    train_ids = np.array([0, 2, 3, 5, 6, 8, 9])  # a subset of a 10-image split
    opp = np.array([[2, 3], [3, 9], [3, 0]])
    r = FakeResults(train_loss_last=loss[-1], train_loss_per_ckpt=loss, train_el2n_per_ckpt=el2n,
                    self_influence=np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]) * 3, train_grad_sq_norm_per_ckpt=norms,
                    top_k_opponents_indices=opp)
    dyn_margin = rng.normal(size=(E, 10)).astype(np.float32)
    dyn_margin[1, 3] = np.nan  # image 3 not seen in epoch 2
    correct = np.array([[0, 1, 1, 1, 0], [0, 1, 0, 1, 0], [1, 0, 1, 1, 0], [1, 1, 1, -1, 0], [0, 0, 1, 1, 0],
                        [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1], [0, 1, 0, 0, 1], [1, 1, 0, 1, 1]], dtype=np.int8).T
    s = detector_scores(r, [{"margin": dyn_margin, "correct": correct}], train_ids)

    np.testing.assert_allclose(s["loss_mean"], loss.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s["el2n"], el2n.mean(0), rtol=1e-6)
    # rank quantile per checkpoint, averaged: with distinct values, rank / n
    ranks = np.argsort(np.argsort(norms, axis=1), axis=1) + 1
    np.testing.assert_allclose(s["self_influence_rank"], (ranks / n).mean(0))
    aum = np.array([np.nanmean(dyn_margin[:, j]) for j in train_ids])
    np.testing.assert_allclose(s["aum"], -aum, rtol=1e-6)
    # forgetting: a 1 -> 0 transition counts; -1 (not seen) is skipped; never learned = E + 1
    want = {0: 1, 2: 2, 3: 1, 5: 0, 6: E + 1, 8: 1, 9: 1}
    np.testing.assert_array_equal(s["forgetting"], [want[j] for j in train_ids])
    np.testing.assert_array_equal(s["opponent_count"], [1, 1, 3, 0, 0, 0, 1])
    members = [s[m] for m in ("loss_last", "aum")]
    quant = [pd.Series(m).rank(pct=True).to_numpy() for m in members]
    np.testing.assert_allclose(s["ensemble"], np.mean(quant, axis=0))


def test_forgetting_and_average_precision_by_hand():
    correct = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=np.int8).T  # (epochs 4, n 3)
    np.testing.assert_array_equal(forgetting_events(correct), [2, 5, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    bad = np.array([True, False, True, False])
    assert average_precision(scores, bad) == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_grad_norms_per_checkpoint_sum_to_self_influence(prepared, tmp_path):
    ckpts = make_random_checkpoints(tmp_path / "c", list_split(prepared, "train").class_names, n=3)
    et.main(["--data_dir", str(prepared), "--checkpoint_dir", str(ckpts[0].parent), "--output_dir", str(tmp_path / "o"),
             "--top_k", "3", "--num_workers", "0", "--batch_size", "5"])
    r = load_results(tmp_path / "o")
    lrs = [c["lr"] for c in r.record["checkpoints"]]
    np.testing.assert_allclose(np.asarray(lrs) @ np.asarray(r["train_grad_sq_norm_per_ckpt"], dtype=np.float64),
                               r["self_influence"], rtol=1e-5)
    assert r["train_margin_per_ckpt"].shape == r["train_loss_per_ckpt"].shape == (3, 18)


def test_pairwise_noise_flips_each_class_to_its_fixed_partner(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", per_class=10)
    assert prepare_data.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "p"), "--image_size", "8", "--num_workers", "0",
                              "--label_noise", "0.3", "--noise_kind", "pairwise"]) == 0
    gt = pd.read_csv(tmp_path / "p" / "mislabeled_ground_truth.csv")
    names = list_split(tmp_path / "p", "train").class_names  # cat, dog, spider
    assert len(gt) > 3
    for t, g in zip(gt.true_class, gt.given_class):
        assert g == prepare_data.pairwise_target(t, names)
    assert prepare_data.pairwise_target("cat", names) == "dog" and prepare_data.pairwise_target("spider", names) == "cat"


def test_training_dynamics_are_recorded_and_checked_against_the_data(prepared, trained, tmp_path):
    names = list_split(prepared, "train").class_names
    dyn = load_dynamics(trained / "ckpt", 18, names, required=True)
    assert dyn["loss"].shape == dyn["margin"].shape == dyn["correct"].shape == (2, 18)
    # 18 images in batches of 4 with the ragged batch dropped: 16 seen per epoch
    assert (~np.isnan(dyn["loss"])).sum(1).tolist() == [16, 16]
    assert ((dyn["correct"] >= 0) == ~np.isnan(dyn["margin"])).all()
    assert ((dyn["margin"] > 0) == (dyn["correct"] == 1))[~np.isnan(dyn["margin"])].all()
    with pytest.raises(UserError, match="another data set"):
        load_dynamics(trained / "ckpt", 17, names)
    with pytest.raises(UserError, match="another data set"):
        load_dynamics(trained / "ckpt", 18, ["a", "b", "c"])


def test_exclude_drops_training_images_and_bad_rows_change_nothing(prepared, trained, tmp_path):
    listing = list_split(prepared, "train")
    base = ["--data_dir", str(prepared), "--arch", "resnet18", "--epochs", "1", "--batch_size", "4", "--weights", "none",
            "--checkpoint_dir", str(tmp_path / "c"), "--models_dir", str(tmp_path / "m"), "--num_workers", "0"]
    for rows, message in ((pd.DataFrame({"train_idx": [1, 99]}), "99"), (pd.DataFrame({"path": ["/no/such.jpg"]}), "/no/such.jpg"),
                          (pd.DataFrame({"name": ["x"]}), "train_idx or a path")):
        rows.to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(UserError, match=message):
            train.main(base + ["--exclude", str(tmp_path / "bad.csv")])
        assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.pth"))
    review = pd.DataFrame({"path": listing.paths[:3], "decision": ["drop", "keep", "drop"]})
    review.to_csv(tmp_path / "review.csv", index=False)
    assert train.main(base + ["--exclude", str(tmp_path / "review.csv")]) == 0
    dyn = load_dynamics(tmp_path / "c", 18, listing.class_names)
    assert np.isnan(dyn["loss"][0, [0, 2]]).all()  # dropped images were never trained on


def test_relabel_moves_images_and_bad_rows_change_nothing(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", per_class=4)
    out = tmp_path / "p"
    assert prepare_data.main(["--raw_dir", str(raw), "--out_dir", str(out), "--image_size", "8", "--num_workers", "0"]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    man = pd.read_csv(out / "manifest.csv")
    row = man[(man.split == "train") & (man.class_name == "cat")].iloc[0]
    for table, message in ((pd.DataFrame({"path": [row.path], "new_class": ["unicorn"]}), "unknown class"),
                           (pd.DataFrame({"path": ["/no/such.jpg"], "new_class": ["dog"]}), "/no/such.jpg"),
                           (pd.DataFrame({"path": [row.path]}), "path and new_class")):
        table.to_csv(tmp_path / "r.csv", index=False)
        with pytest.raises(UserError, match=message):
            prepare_data.main(["--raw_dir", str(raw), "--out_dir", str(out), "--image_size", "8", "--num_workers", "0",
                               "--relabel", str(tmp_path / "r.csv"), "--overwrite"])
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    pd.DataFrame({"path": [row.path], "new_class": ["dog"]}).to_csv(tmp_path / "r.csv", index=False)
    assert prepare_data.main(["--raw_dir", str(raw), "--out_dir", str(out), "--image_size", "8", "--num_workers", "0",
                              "--relabel", str(tmp_path / "r.csv"), "--overwrite"]) == 0
    man2 = pd.read_csv(out / "manifest.csv")
    assert man2.set_index("source_path").loc[row.source_path, "class_name"] == "dog"
    assert (man2.class_name.value_counts() - man.class_name.value_counts()).to_dict() == {"cat": -1, "dog": 1, "spider": 0}


def test_clean_and_retrain_end_to_end(prepared, trained, tmp_path):
    out = tmp_path / "cr"
    assert clean_and_retrain.main(["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--checkpoint_dir",
                                   str(trained / "ckpt"), "--out_dir", str(out), "--fraction", "0.2", "--random_seeds", "2",
                                   "--epochs", "1", "--num_workers", "0", "--score", "loss_mean", "--no_reference"]) == 0
    import json

    s = json.loads((out / "clean_and_retrain.json").read_text())
    assert set(s["arms"]) == {"loss_mean", "self_influence", "random_0", "random_1"}
    assert all(a["dropped"] == 4 for a in s["arms"].values())
    for k in s["arms"]:  # each arm really retrained without its list
        excluded = pd.read_csv(out / k / "exclude.csv")
        assert len(excluded) == s["arms"][k]["dropped"]
        assert (out / k / "checkpoints" / "finetune_epoch_1.pth").exists()
    assert s["settings"]["epochs"] == 1 and s["settings"]["seed"] == 0
    shutil.copytree(trained / "ckpt", tmp_path / "ck2")
    (tmp_path / "ck2" / "train_args.json").unlink()
    with pytest.raises(UserError, match="do not record how they were trained"):
        clean_and_retrain.main(["--results_dir", str(trained / "res"), "--data_dir", str(prepared),
                                "--checkpoint_dir", str(tmp_path / "ck2")])


def test_relabel_checks_a_review_rows_train_idx_against_its_path(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", per_class=4)
    out = tmp_path / "p"
    args = ["--raw_dir", str(raw), "--out_dir", str(out), "--image_size", "8", "--num_workers", "0"]
    assert prepare_data.main(args) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    man = pd.read_csv(out / "manifest.csv")
    row = man[(man.split == "train") & (man.class_name == "cat")].iloc[0]
    pd.DataFrame({"train_idx": [row["index"] + 1], "path": [row.path], "new_class": ["dog"], "decision": ["relabel"]}).to_csv(
        tmp_path / "r.csv", index=False)
    with pytest.raises(UserError, match=f"is training image #{row['index']} now"):
        prepare_data.main(args + ["--relabel", str(tmp_path / "r.csv"), "--overwrite"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    pd.DataFrame({"train_idx": [row["index"]], "path": [row.path], "new_class": ["dog"], "decision": ["relabel"]}).to_csv(
        tmp_path / "r.csv", index=False)
    assert prepare_data.main(args + ["--relabel", str(tmp_path / "r.csv"), "--overwrite"]) == 0


def test_clean_and_retrain_reports_test_accuracy_when_the_arms_select_on_val(tmp_path):
    """With a val split, train.py's val_acc is validation accuracy: each arm's test_accuracy must be its model's accuracy
    on the test split (it was the checkpoint's val_acc, which meant test only while selection ran on test)."""
    import json

    from TracIn import efficient_tracin
    from TracIn.experiments.retraining import full_test_logits
    from lib.data_utils import list_split

    raw = make_raw_tree(tmp_path / "raw", per_class=12)
    data = tmp_path / "p"
    assert prepare_data.main(["--raw_dir", str(raw), "--out_dir", str(data), "--image_size", "8", "--num_workers", "0",
                              "--label_noise", "0.2", "--val_fraction", "0.3"]) == 0
    import train

    assert train.main(["--data_dir", str(data), "--arch", "resnet18", "--epochs", "1", "--batch_size", "4", "--weights", "none",
                       "--checkpoint_dir", str(tmp_path / "ck"), "--models_dir", str(tmp_path / "m"), "--num_workers", "0"]) == 0
    assert efficient_tracin.main(["--data_dir", str(data), "--checkpoint_dir", str(tmp_path / "ck"), "--output_dir",
                                  str(tmp_path / "res"), "--top_k", "3", "--num_workers", "0"]) == 0
    out = tmp_path / "cr"
    assert clean_and_retrain.main(["--results_dir", str(tmp_path / "res"), "--data_dir", str(data), "--checkpoint_dir",
                                   str(tmp_path / "ck"), "--out_dir", str(out), "--random_seeds", "1", "--num_workers", "0",
                                   "--no_reference"]) == 0
    s = json.loads((out / "clean_and_retrain.json").read_text())
    labels = list_split(data, "test").labels
    for name, arm in s["arms"].items():
        last = out / name / "checkpoints" / "finetune_epoch_1.pth"
        logits = full_test_logits(last, str(data), 0, torch.device("cpu"))
        assert arm["test_accuracy"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
