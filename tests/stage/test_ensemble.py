"""Ensembles: several training runs scored as one (efficient_tracin --members) and their members (TracIn.ensemble).
An ensemble of one is today's run to the bit; an ensemble's scores are the float64 mean of its members' dense scores."""
import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from lib.cli import UserError
from lib.data_utils import list_split
from helpers import make_random_checkpoints, sh
from TracIn import ensemble
from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job
from TracIn.core.methods import method_for
from TracIn.core.results import load_results, run_id
from TracIn.core.run import InfluenceRun

ARRAYS = ("top_k_influences_values", "top_k_influences_indices", "top_k_opponents_values", "top_k_opponents_indices",
          "self_influence", "test_indices", "test_pred", "train_loss_last", "train_pred_last", "train_loss_per_ckpt")


@pytest.fixture(scope="module")
def members(prepared, tmp_path_factory):
    """Two members of three random checkpoints each (TracIn needs no training to be exact)."""
    names = list_split(prepared, "train").class_names
    root = tmp_path_factory.mktemp("members")
    a = make_random_checkpoints(root / "a", names, n=3, seed=100)[0].parent
    b = make_random_checkpoints(root / "b", names, n=3, seed=200, lrs=(0.02, 0.01, 0.005))[0].parent
    return a, b


def run(prepared, out, **settings):
    cfg = {"data_dir": str(prepared), "output_dir": str(out), "top_k": 5, "batch_size": 4, "num_workers": 0, "train_block": 7,
           "test_block": 4, **settings}
    return tracin_job(TracInConfig(**cfg))


@pytest.mark.parametrize("score_fn,normalize", [("influence_last", "none"), ("tracin", "train"), ("influence", "none")])
def test_an_ensemble_of_one_member_is_the_single_run_to_the_bit(prepared, members, tmp_path, score_fn, normalize):
    a = members[0]
    run(prepared, tmp_path / "single", checkpoint_dir=str(a), score_fn=score_fn, normalize=normalize)
    run(prepared, tmp_path / "one", members=[str(a)], score_fn=score_fn, normalize=normalize)
    single, one = load_results(tmp_path / "single"), load_results(tmp_path / "one")
    for k in ARRAYS:
        assert np.array_equal(np.asarray(single[k]), np.asarray(one[k])), k
    assert run_id(single.record) == run_id(one.record)


@pytest.mark.parametrize("score_fn,normalize", [("influence_last", "none"), ("tracin", "none"), ("tracin", "train"),
                                                ("influence", "none"), ("trak", "none")])
def test_an_ensembles_scores_are_the_mean_of_its_members_dense_scores(prepared, members, tmp_path, score_fn, normalize):
    a, b = members
    method = method_for(score_fn, normalize)
    dense = []
    for name, folder in (("a", a), ("b", b)):
        run(prepared, tmp_path / name, checkpoint_dir=str(folder), score_fn=score_fn, normalize=normalize)
        fs = InfluenceRun.from_results(tmp_path / name).factors()
        dense.append(fs.dense(method, 10.0, 2048))
    mean = (dense[0] + dense[1]) / 2  # float64
    run(prepared, tmp_path / "ens", members=[str(a), str(b)], score_fn=score_fn, normalize=normalize, trak_dim=2048)
    r = load_results(tmp_path / "ens")
    k = r["top_k_influences_indices"].shape[1]
    want_idx = np.argsort(-mean, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(np.asarray(r["top_k_influences_values"]), np.take_along_axis(mean, want_idx, 1), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(r["top_k_influences_indices"]), want_idx)
    opp = np.argsort(mean, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(np.asarray(r["top_k_opponents_values"]), np.take_along_axis(mean, opp, 1), rtol=1e-5, atol=1e-7)
    # the ensemble's own dense matrix (what the LDS measures) is the same mean
    np.testing.assert_allclose(InfluenceRun.from_results(tmp_path / "ens").factors().dense(method, 10.0, 2048), mean,
                               rtol=1e-5, atol=1e-9)
    # self-influence: the mean of the members' (TracIn's sum_t lr_t |g_t|^2 per member)
    singles = [np.asarray(load_results(tmp_path / n)["self_influence"], dtype=np.float64) for n in ("a", "b")]
    np.testing.assert_allclose(np.asarray(r["self_influence"]), (singles[0] + singles[1]) / 2, rtol=1e-5)
    assert r.record["args"]["member_sizes"] == [3, 3]


def test_members_of_other_classes_or_data_or_the_same_run_twice_are_refused(prepared, members, tmp_path):
    a, b = members
    other = make_random_checkpoints(tmp_path / "other", ["x", "y", "z", "w"], n=1)[0].parent
    base = ["-m", "TracIn.efficient_tracin", "--data_dir", prepared, "--output_dir", tmp_path / "out", "--top_k", "2",
            "--num_workers", "0"]
    res = sh(*base, "--members", a, other)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    b2 = tmp_path / "b2"
    shutil.copytree(b, b2)
    a2 = tmp_path / "a2"
    shutil.copytree(a, a2)
    (a2 / "train_args.json").write_text(json.dumps({"data_train_key": "0" * 16}))
    (b2 / "train_args.json").write_text(json.dumps({"data_train_key": "1" * 16}))
    res = sh(*base, "--members", a2, b2)
    assert res.returncode == 2 and "another training split" in res.stderr and res.stderr.count("\n") == 1
    res = sh(*base, "--members", a, a)
    assert res.returncode == 2 and "twice" in res.stderr
    res = sh(*base, "--members", a, "--checkpoints", *sorted(map(str, b.glob("*.pth"))))
    assert res.returncode == 2 and "one or the other" in res.stderr
    assert not (tmp_path / "out" / "run.json").exists()


def test_a_member_killed_mid_training_resumes_to_the_weights_of_an_uninterrupted_one(trained, tmp_path):
    original = trained / "ckpt"
    args = ["--checkpoint_dir", str(original), "--members", "2", "--num_workers", "0", "--device", "cpu"]
    assert ensemble.main(args + ["--out_dir", str(tmp_path / "whole")]) == 0
    saved = json.loads((original / "train_args.json").read_text())
    member = json.loads((tmp_path / "whole" / "member_1" / "checkpoints" / "train_args.json").read_text())
    assert member["seed"] == saved["seed"] + 1
    for k in ("arch", "epochs", "batch_size", "learning_rate", "save_checkpoints_every", "data_train_key", "n_train"):
        assert member[k] == saved[k], k
    # killed in its second epoch (the 6th step of 18 training images in batches of 4), then run again
    ensemble.Owner(ensemble.TOOL).folder(tmp_path / "killed").fill()  # as ensemble.main marks it before its members
    argv = ensemble.member_argv(1, original, tmp_path / "killed", saved["data_dir"], 0, "cpu")
    killed = sh("tests/kill_after.py", "train", "6", *argv)
    assert killed.returncode != 0
    assert ensemble.state(tmp_path / "killed" / "member_1", saved["epochs"]) == "partial"
    assert ensemble.main(args + ["--out_dir", str(tmp_path / "killed")]) == 0
    for epoch in (1, 2):
        w = torch.load(tmp_path / "whole" / "member_1" / "checkpoints" / f"finetune_epoch_{epoch}.pth", weights_only=True)
        k = torch.load(tmp_path / "killed" / "member_1" / "checkpoints" / f"finetune_epoch_{epoch}.pth", weights_only=True)
        for name in w["model_state"]:
            assert torch.equal(w["model_state"][name], k["model_state"][name]), (epoch, name)
    # a finished member is kept, not retrained
    before = (tmp_path / "whole" / "member_1" / "checkpoints" / "finetune_epoch_2.pth").stat().st_mtime_ns
    assert ensemble.main(args + ["--out_dir", str(tmp_path / "whole")]) == 0
    assert (tmp_path / "whole" / "member_1" / "checkpoints" / "finetune_epoch_2.pth").stat().st_mtime_ns == before


def test_a_fork_continues_the_originals_checkpoint_with_its_own_seed_and_keeps_its_first_epochs(trained, tmp_path):
    from lib.training_dynamics import load_dynamics

    original = trained / "ckpt"
    saved = json.loads((original / "train_args.json").read_text())
    args = ["--checkpoint_dir", str(original), "--members", "2", "--num_workers", "0", "--device", "cpu", "--fork_epoch", "1",
            "--out_dir", str(tmp_path / "forks")]
    assert ensemble.main(args) == 0
    folder = tmp_path / "forks" / "member_1" / "checkpoints"
    assert sorted(p.name for p in folder.glob("finetune_epoch_*.pth")) == ["finetune_epoch_2.pth"]  # its own epochs only
    rec = json.loads((folder / "train_args.json").read_text())
    assert rec["seed"] == saved["seed"] + 1 and rec["forked"]["epoch"] == 1
    assert rec["forked"]["train_run"] == saved["train_run"] and rec["train_run"] != saved["train_run"]
    ours = torch.load(folder / "finetune_epoch_2.pth", weights_only=True)
    theirs = torch.load(original / "finetune_epoch_2.pth", weights_only=True)
    # epoch 2 only: lr_t is the rate of the epochs since the fork; the weights differ from the original's epoch 2
    assert ours["lr"] == pytest.approx(theirs["lr"])
    assert not torch.equal(ours["model_state"]["fc.weight"], theirs["model_state"]["fc.weight"])
    names = list_split(saved["data_dir"], "train").class_names
    mine = load_dynamics(folder, saved["n_train"], names)
    first = load_dynamics(original, saved["n_train"], names)
    np.testing.assert_array_equal(mine["loss"][0], first["loss"][0])  # epoch 1 is the original's
    assert not np.array_equal(np.nan_to_num(mine["loss"][1]), np.nan_to_num(first["loss"][1]))
    # a folder of independent members is not taken for forks; a fork of the last epoch or a missing one is refused
    with pytest.raises(UserError, match="a fork starts before the last"):
        ensemble.main(args[:-1] + [str(tmp_path / "forks2"), "--fork_epoch", "2"])
    with pytest.raises(UserError, match="holds a member of another kind"):
        ensemble.main(args[:-4] + ["--out_dir", str(tmp_path / "forks"), "--fork_epoch", "0"])
    # the fork is a member like any other: efficient_tracin --members scores the two together
    run(saved["data_dir"], tmp_path / "ens", members=[str(original), str(folder)], score_fn="influence_last", normalize="none",
        all_checkpoints=True)  # the original's every checkpoint (it selected epoch 1)
    assert load_results(tmp_path / "ens").record["args"]["member_sizes"] == [2, 1]
    # the mislabel detectors over the two: AUM is the mean of each member's own (from its own dynamics file)
    from TracIn import detectors, mislabel_detection

    assert mislabel_detection.main(["--results_dir", str(tmp_path / "ens"), "--data_dir", saved["data_dir"]]) == 0
    table = pd.read_csv(tmp_path / "ens" / "mislabel" / "mislabel_candidates.csv").sort_values("train_idx")
    want = (detectors.aum(first["margin"]) + detectors.aum(mine["margin"])) / 2
    np.testing.assert_allclose(table["aum"].to_numpy(), want, rtol=1e-6)
    assert not np.allclose(want, detectors.aum(first["margin"]))


@pytest.mark.parametrize("score_fn", ["influence_last", "tracin"])
def test_explain_on_an_ensemble_equals_its_arrays_and_its_predictions_are_the_members_mean(prepared, members, tmp_path,
                                                                                              score_fn):
    import TracIn

    a, b = members
    run(prepared, tmp_path / "ens", members=[str(a), str(b)], score_fn=score_fn, normalize="none")
    r = TracIn.open(tmp_path / "ens", data_dir=str(prepared))
    ids = np.array([0, 2, 3])
    table = r.explain([r.test_list.paths[i] for i in ids], k=5)
    got = table[table.kind == "proponent"]
    np.testing.assert_array_equal(got.train_idx.to_numpy().reshape(3, 5),
                                  np.load(tmp_path / "ens" / "top_k_influences_indices.npy")[ids])
    np.testing.assert_allclose(got.score.to_numpy().reshape(3, 5), np.load(tmp_path / "ens" / "top_k_influences_values.npy")[ids],
                               rtol=1e-6, atol=1e-6)
    # the shipped predictions: the argmax of the members' mean last-checkpoint logits
    fs = r.run.factors()
    mean = (fs.test_logits[2] + fs.test_logits[5]) / 2
    np.testing.assert_array_equal(np.load(tmp_path / "ens" / "test_pred.npy"), mean.argmax(1))
    assert (r.test_table().prediction.to_numpy() == np.asarray(r.class_names)[mean.argmax(1)]).all()


def test_a_fork_of_another_split_or_of_the_last_epoch_is_one_line_and_writes_nothing(trained, tmp_path):
    import train

    original = trained / "ckpt"
    saved = json.loads((original / "train_args.json").read_text())
    base = ["--data_dir", saved["data_dir"], "--arch", "resnet18", "--epochs", "2", "--batch_size", "4", "--weights", "none",
            "--save_checkpoints_every", "1", "--num_workers", "0", "--no-hflip", "--seed", "5"]
    with pytest.raises(UserError, match="a fork of a 2-epoch run starts before its last epoch"):
        train.main(base + ["--checkpoint_dir", str(tmp_path / "a"), "--models_dir", str(tmp_path / "ma"),
                           "--fork_from", str(original / "finetune_epoch_2.pth")])
    # the same checkpoint recorded as trained on another split of the data (re-prepared with another seed)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(original / "training_dynamics.npz", other / "training_dynamics.npz")
    ckpt = torch.load(original / "finetune_epoch_1.pth", weights_only=True)
    ckpt["split_key"] = "another-split"
    torch.save(ckpt, other / "finetune_epoch_1.pth")
    with pytest.raises(UserError, match="another split of the data"):
        train.main(base + ["--checkpoint_dir", str(tmp_path / "b"), "--models_dir", str(tmp_path / "mb"),
                           "--fork_from", str(other / "finetune_epoch_1.pth")])
    assert not list((tmp_path / "b").glob("*.pth")) and not (tmp_path / "b" / "train_args.json").exists()
    # refused before --overwrite clears anything: a run already in the folder keeps its checkpoints
    shutil.copytree(original, tmp_path / "c")
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    with pytest.raises(UserError, match="another split of the data"):
        train.main(base + ["--checkpoint_dir", str(tmp_path / "c"), "--models_dir", str(tmp_path / "mc"), "--overwrite",
                           "--fork_from", str(other / "finetune_epoch_1.pth")])
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before


def test_a_fork_of_a_run_of_other_settings_is_refused_naming_each_difference(trained, tmp_path):
    """--fork_from's help says "a run of these settings": another learning rate, batch size or epoch count is refused
    (one line listing each, before anything is written), not trained as a silent mix."""
    import train

    original = trained / "ckpt"
    saved = json.loads((original / "train_args.json").read_text())
    base = ["--data_dir", saved["data_dir"], "--arch", "resnet18", "--weights", "none", "--save_checkpoints_every", "1",
            "--num_workers", "0", "--no-hflip", "--seed", "5", "--checkpoint_dir", str(tmp_path / "a"), "--models_dir",
            str(tmp_path / "ma"), "--fork_from", str(original / "finetune_epoch_1.pth")]
    with pytest.raises(UserError) as e:
        train.main(base + ["--epochs", "3", "--batch_size", "2", "--learning_rate", "0.5"])
    msg = str(e.value)
    assert "\n" not in msg and all(f"--{k}" in msg for k in ("epochs", "batch_size", "learning_rate")), msg
    assert "--weight_decay" not in msg and "--image_size" not in msg
    with pytest.raises(UserError, match="--hflip"):
        train.main([a for a in base if a != "--no-hflip"] + ["--epochs", "2", "--batch_size", "4"])
    assert not list((tmp_path / "a").glob("*.pth")) and not (tmp_path / "a" / "train_args.json").exists()


def test_mislabel_detection_on_an_ensemble_refuses_a_foreign_checkpoint_dir_and_advises_what_works(prepared, members, trained,
                                                                                                    tmp_path):
    """On an ensemble's results every member's dynamics come from its own folder: a --checkpoint_dir that is no member's
    is refused (it was ignored), and a member retrained since is told to rerun efficient_tracin --members, not to pass
    --checkpoint_dir (which ensembles do not read)."""
    from TracIn import mislabel_detection

    a, b = (tmp_path / "a", tmp_path / "b")
    for src, dst in zip(members, (a, b)):
        shutil.copytree(src, dst)
        shutil.copy(trained / "ckpt" / "training_dynamics.npz", dst)  # another training run's dynamics: "retrained since"
    run(prepared, tmp_path / "ens", members=[str(a), str(b)], score_fn="influence_last", normalize="none")
    argv = ["--results_dir", str(tmp_path / "ens"), "--data_dir", str(prepared)]
    with pytest.raises(UserError, match="is not a member of this ensemble") as e:
        mislabel_detection.main(argv + ["--checkpoint_dir", str(trained / "ckpt")])
    assert "\n" not in str(e.value)
    for given in ([], ["--checkpoint_dir", str(a)]):
        with pytest.raises(UserError) as e:
            mislabel_detection.main(argv + given)
        msg = str(e.value)
        assert "efficient_tracin --members" in msg and "--checkpoint_dir" not in msg and "\n" not in msg, msg
    assert not (tmp_path / "ens" / "mislabel").exists()
