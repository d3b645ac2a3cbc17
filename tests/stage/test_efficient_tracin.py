"""efficient_tracin end to end: parity with Captum's TracInCP, resume, a damaged cache, subsets, bad input."""
import json
import logging
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from lib.checkpoints import load_checkpoint, model_from_checkpoint
from lib.cli import UserError
from lib.data_utils import ImageListDataset, build_transform, list_split
from helpers import damage_npy, make_random_checkpoints
from TracIn.core import factors
from TracIn.core import run as core_run
from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job


@pytest.fixture(scope="module")
def ckpts(prepared, tmp_path_factory):
    names = list_split(prepared, "train").class_names
    return make_random_checkpoints(tmp_path_factory.mktemp("ckpt"), names, n=3)


def config(prepared, ckpts, out, **settings) -> TracInConfig:
    return TracInConfig(**{"data_dir": str(prepared), "checkpoint_dir": str(ckpts[0].parent), "output_dir": str(out), "top_k": 5,
                           "batch_size": 4, "num_workers": 0, "train_block": 7, "test_block": 4, "score_fn": "tracin",
                           "normalize": "none", **settings})


def run(prepared, ckpts, out, **settings):
    """A TracIn job through the library, as efficient_tracin runs it."""
    return tracin_job(config(prepared, ckpts, out, **settings))


def load_outputs(out):
    names = ["top_k_influences_values", "top_k_influences_indices", "top_k_opponents_values",
             "top_k_opponents_indices", "self_influence", "test_indices"]
    return {n: np.load(out / f"{n}.npy") for n in names}


def test_matches_captum_tracincp(prepared, ckpts, tmp_path):
    from captum.influence import TracInCP

    run(prepared, ckpts, tmp_path / "out")
    ours = load_outputs(tmp_path / "out")
    train_list, test_list = list_split(prepared, "train"), list_split(prepared, "test")
    tf = build_transform(32, train=False)
    stack = lambda ds: (torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))]))
    x_tr, y_tr = stack(ImageListDataset(train_list, tf))
    x_te, y_te = stack(ImageListDataset(test_list, tf))
    model = model_from_checkpoint(load_checkpoint(ckpts[0])).eval()

    def load(m, path):
        c = load_checkpoint(path)
        m.load_state_dict(c["model_state"])
        m.eval()
        return c["lr"]

    tracin = TracInCP(model, torch.utils.data.TensorDataset(x_tr, y_tr), [str(p) for p in ckpts], load,
                      layers=["fc"], loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=5)
    full = tracin.influence((x_te, y_te), k=None)  # (n_test, n_train)
    assert full.shape == (6, 18)
    want_v, want_i = torch.topk(full, 5, dim=1)
    np.testing.assert_array_equal(ours["top_k_influences_indices"], want_i.numpy())
    np.testing.assert_allclose(ours["top_k_influences_values"], want_v.numpy(), rtol=1e-4, atol=1e-7)
    want_v, want_i = torch.topk(-full, 5, dim=1)
    np.testing.assert_array_equal(ours["top_k_opponents_indices"], want_i.numpy())
    np.testing.assert_allclose(ours["top_k_opponents_values"], -want_v.numpy(), rtol=1e-4, atol=1e-7)
    self_inf = tracin.self_influence(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_tr, y_tr), batch_size=5))
    np.testing.assert_allclose(ours["self_influence"], self_inf.numpy(), rtol=1e-4)


def test_outputs_shapes_dtypes_csv_and_run_json(prepared, ckpts, tmp_path):
    summary = run(prepared, ckpts, tmp_path / "out")
    o = load_outputs(tmp_path / "out")
    assert o["top_k_influences_values"].shape == (6, 5) and o["top_k_influences_values"].dtype == np.float32
    assert o["top_k_influences_indices"].dtype == np.int64 and o["self_influence"].shape == (18,)
    assert (np.diff(o["top_k_influences_values"], axis=1) <= 0).all()
    assert (np.diff(o["top_k_opponents_values"], axis=1) >= 0).all()
    csv = pd.read_csv(tmp_path / "out" / "top_k_influences.csv")
    assert len(csv) == 6 * 5 * 2 and set(csv.kind) == {"proponent", "opponent"}
    man = pd.read_csv(prepared / "manifest.csv")
    train_paths = man[man.split == "train"].set_index("index").path
    assert (csv.train_path.values == train_paths.loc[csv.train_idx].values).all()
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [c["lr"] for c in meta["checkpoints"]] == [0.01, 0.004, 0.002]
    assert summary["pairs_scored"] == 6 * 18


def test_resume_after_interruption_gives_identical_arrays(prepared, ckpts, tmp_path, monkeypatch):
    run(prepared, ckpts, tmp_path / "clean")
    cfg = config(prepared, ckpts, tmp_path / "resumed")
    seen, to_device = [], factors.batch_to_device

    def stop_after_two_batches(x, device):  # Ctrl-C as the factor pass starts its third batch
        if len(seen) == 2:
            raise KeyboardInterrupt("stopped by the test")
        seen.append(1)
        return to_device(x, device)

    with monkeypatch.context() as m:
        m.setattr(factors, "batch_to_device", stop_after_two_batches)
        with pytest.raises(KeyboardInterrupt):
            tracin_job(cfg)
    assert not (tmp_path / "resumed" / "top_k_influences_values.npy").exists()
    summary = tracin_job(cfg)
    assert summary["batches_computed"] == {"train": 3, "test": 2}  # 5 train batches, 2 were done
    a, b = load_outputs(tmp_path / "clean"), load_outputs(tmp_path / "resumed")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_factor_cache_is_recomputed_never_read(prepared, ckpts, tmp_path, caplog, how):
    """A cached A_fc.npy cut short (which np.load's r+ map would zero-extend) or with a byte changed: the re-score
    computes that checkpoint's rows again and gives the same arrays, never scores from zeros or the changed byte."""
    out = tmp_path / "out"
    run(prepared, ckpts, out)
    before = load_outputs(out)
    damaged = sorted((out / "factors").glob("train-*/*/A_fc.npy"))[-1]
    damage_npy(damaged, how)
    with caplog.at_level(logging.WARNING):
        summary = run(prepared, ckpts, out)
    after = load_outputs(out)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert str(damaged) in caplog.text and "computed again" in caplog.text
    assert summary["batches_computed"] == {"train": 5, "test": 0}  # 18 training images in batches of 4


def test_subsets_refer_to_full_split_indices(prepared, ckpts, tmp_path):
    run(prepared, ckpts, tmp_path / "full", top_k=18)
    run(prepared, ckpts, tmp_path / "sub", train_subset=10, test_subset=3, top_k=10)
    sub, full = load_outputs(tmp_path / "sub"), load_outputs(tmp_path / "full")
    train_ids = np.load(tmp_path / "sub" / "train_indices.npy")
    assert len(train_ids) == 10 and set(sub["top_k_influences_indices"].ravel()) == set(train_ids)
    for row, test_idx in enumerate(sub["test_indices"]):
        # the subset's scores are the full run's scores restricted to the subset's columns
        full_row = dict(zip(full["top_k_influences_indices"][test_idx], full["top_k_influences_values"][test_idx]))
        for j, v in zip(sub["top_k_influences_indices"][row], sub["top_k_influences_values"][row]):
            assert full_row[j] == pytest.approx(v, rel=1e-5)


@pytest.mark.parametrize("extra,message", [
    (["--top_k", "19"], "larger than the 18 training images"),
    (["--checkpoint_dir", "/nonexistent"], "no checkpoints"),
    (["--layers", "layer9"], "no layer named 'layer9'"),
    (["--layers", "bn1"], "BatchNorm2d, not a supported type"),
    (["--layers", "layer4.1.conv2", "--proj_dim", "5000"], "larger than layer layer4.1.conv2's width"),
    (["--lr_weights", "1", "2"], "has 2 values for 3 checkpoints"),
    (["--top_k", "0"], "out of range"),
    (["--normalize", "cosine"], "invalid choice"),
    (["--cache_dir", "elsewhere", "--num_shards", "2"], "--cache_dir is for unsharded runs"),
])
def test_bad_input_is_one_line_exit_2(prepared, ckpts, tmp_path, extra, message):
    argv = ["--data_dir", str(prepared), "--checkpoint_dir", str(ckpts[0].parent), "--output_dir", str(tmp_path / "o"),
            "--top_k", "5", "--num_workers", "0", *extra]
    out = subprocess.run([sys.executable, "TracIn/efficient_tracin.py", *argv], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o" / "top_k_influences_values.npy").exists()


def test_checkpoint_with_other_classes_is_refused(prepared, tmp_path):
    make_random_checkpoints(tmp_path / "c", ["a", "b", "c"], n=1)
    with pytest.raises(UserError, match="trained on classes"):
        tracin_job(TracInConfig(data_dir=str(prepared), checkpoint_dir=str(tmp_path / "c"), output_dir=str(tmp_path / "o"), top_k=2))


def test_sharded_runs_merge_to_the_unsharded_result(prepared, ckpts, tmp_path):
    run(prepared, ckpts, tmp_path / "one", train_block=4)
    sizes = []
    for i in range(3):  # 18 images = 5 units of 4: shards of 2, 2 and 1 units
        sizes.append(run(prepared, ckpts, tmp_path / "sharded", num_shards=3, shard_index=i, train_block=4)["n_train"])
    assert sizes == [8, 8, 2]
    assert not (tmp_path / "sharded" / "top_k_influences_values.npy").exists()
    run(prepared, ckpts, tmp_path / "sharded", num_shards=3, merge=True, train_block=4)
    a, b = load_outputs(tmp_path / "one"), load_outputs(tmp_path / "sharded")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "one" / "top_k_influences.csv"),
                                  pd.read_csv(tmp_path / "sharded" / "top_k_influences.csv"))


def test_merge_refuses_unfinished_shards(prepared, ckpts, tmp_path):
    run(prepared, ckpts, tmp_path / "o", num_shards=2, shard_index=1, train_block=4)
    with pytest.raises(UserError, match="shard_000"):
        run(prepared, ckpts, tmp_path / "o", num_shards=2, merge=True, train_block=4)
    with pytest.raises(UserError, match="--shard_index"):
        run(prepared, ckpts, tmp_path / "o", num_shards=2, shard_index=2)
    with pytest.raises(UserError, match="shard unit"):  # lcm(4, 7) = 28 > 18 images: one unit
        run(prepared, ckpts, tmp_path / "o2", num_shards=2, shard_index=0)


def test_device_resident_factors_give_the_same_outputs(prepared, ckpts, tmp_path, monkeypatch):
    """The GPU path (all factors copied to the device once) is exercised here on the CPU."""
    run(prepared, ckpts, tmp_path / "memmap")
    calls = []
    monkeypatch.setattr(core_run, "fits_on_device", lambda stores, device: calls.append(device) or True)
    run(prepared, ckpts, tmp_path / "resident")
    assert calls, "the resident path was not taken"
    a, b = load_outputs(tmp_path / "memmap"), load_outputs(tmp_path / "resident")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("normalize", ["train", "both"])
def test_normalized_scores_equal_torch_func_gradients_divided_by_their_norms(prepared, ckpts, tmp_path, normalize):
    from reference import per_example_grads

    run(prepared, ckpts, tmp_path / "out", normalize=normalize, top_k=18)
    ours = load_outputs(tmp_path / "out")
    train_list, test_list = list_split(prepared, "train"), list_split(prepared, "test")
    tf = build_transform(32, train=False)
    stack = lambda ds: (torch.stack([ds[i][0] for i in range(len(ds))]).double(), torch.tensor([ds[i][1] for i in range(len(ds))]))
    x_tr, y_tr = stack(ImageListDataset(train_list, tf))
    x_te, y_te = stack(ImageListDataset(test_list, tf))
    full = 0
    for path in ckpts:  # float64 per-example gradients of fc (weight and bias), normalised per checkpoint
        c = load_checkpoint(path)
        model = model_from_checkpoint(c).double().eval()
        g_tr = per_example_grads(model, ["fc.weight", "fc.bias"], x_tr, y_tr)
        g_te = per_example_grads(model, ["fc.weight", "fc.bias"], x_te, y_te)
        g_tr = g_tr / g_tr.norm(dim=1, keepdim=True)
        if normalize == "both":
            g_te = g_te / g_te.norm(dim=1, keepdim=True)
        full = full + c["lr"] * (g_te @ g_tr.T)
    want_v, want_i = torch.sort(full, dim=1, descending=True)
    np.testing.assert_allclose(ours["top_k_influences_values"], want_v.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(ours["top_k_influences_indices"], want_i.numpy())
    if normalize == "both":
        assert np.abs(ours["top_k_influences_values"]).max() <= sum(load_checkpoint(p)["lr"] for p in ckpts) * (1 + 1e-5)
    # self-influence stays TracIn's own, unnormalised definition
    plain = tmp_path / "plain"
    run(prepared, ckpts, plain)
    np.testing.assert_array_equal(ours["self_influence"], load_outputs(plain)["self_influence"])


@pytest.mark.parametrize("score_fn", ["influence_last", "influence"])
def test_a_rescore_reuses_the_kept_curvature_and_gives_identical_arrays(prepared, ckpts, tmp_path, monkeypatch, score_fn):
    """The K-FAC moments and their damped inverses are kept beside the factor cache: a re-score (another --top_k, or the
    same run again) reads neither the training factors for them nor inverts again, and the arrays are bit-identical."""
    from TracIn.core import curvature

    run(prepared, ckpts, tmp_path / "first", score_fn=score_fn, overwrite=True)
    first = load_outputs(tmp_path / "first")
    stores = list((tmp_path / "first").rglob("curvature-*.pt"))
    assert len(stores) == 1
    built = []
    real_init, real_inv = curvature.KroneckerCurvature.__init__, curvature.KroneckerCurvature.damped_inverses
    monkeypatch.setattr(curvature.KroneckerCurvature, "__init__", lambda self, *a, **k: built.append("moments") or real_init(self, *a, **k))
    monkeypatch.setattr(curvature.KroneckerCurvature, "damped_inverses",
                        staticmethod(lambda *a: built.append("inverse") or real_inv(*a)))
    run(prepared, ckpts, tmp_path / "first", score_fn=score_fn)
    assert built == []
    again = load_outputs(tmp_path / "first")
    for k in first:
        np.testing.assert_array_equal(first[k], again[k], err_msg=k)
    run(prepared, ckpts, tmp_path / "first", score_fn=score_fn, damping=3.0)  # a new damping: inverted, moments kept
    assert "moments" not in built and "inverse" in built
    stores[0].write_bytes(stores[0].read_bytes()[:50])  # a truncated store is recomputed, not trusted
    built.clear()
    run(prepared, ckpts, tmp_path / "first", score_fn=score_fn)
    assert "moments" in built
    for k in first:
        np.testing.assert_array_equal(first[k], load_outputs(tmp_path / "first")[k], err_msg=k)
