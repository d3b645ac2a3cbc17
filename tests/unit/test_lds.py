"""The linear datamodeling score and the fc influence function: LDS against a hand computation and scipy, the
Gauss-Newton matrix against autograd's Hessian in float64, the eigenvalue-corrected (EK-FAC) scores against the
dense computation, influence against leave-one-out retraining of a linear model, and a killed LDS run resumed."""
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from TracIn import lds
from TracIn.core import curvature
from TracIn.experiments import lds_score


def test_lds_equals_a_hand_computation():
    scores = np.array([[1.0, 2.0, 3.0], [3.0, -1.0, 0.0]])           # (n_test, n_train)
    masks = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]], bool)
    margins = np.array([[0.1, 0.4], [0.3, 0.1], [0.2, 0.9], [0.5, 0.2]])
    # test 0: predictions 3, 5, 4, 6 rank like the margins: 1. test 1: predictions 2, -1, 3, 2 (a tie, mean ranks
    # 1.5, 0, 3, 1.5) against margin ranks 2, 0, 3, 1: centred products 0 + 2.25 + 2.25 + 0 over sqrt(4.5 * 5)
    np.testing.assert_allclose(lds_score.lds(scores, masks, margins), [1.0, 4.5 / np.sqrt(4.5 * 5)])
    rng = np.random.default_rng(0)
    pred, actual = rng.normal(size=(30, 5)).round(1), rng.normal(size=(30, 5))
    np.testing.assert_allclose(lds_score.spearman_rows(pred, actual), [spearmanr(pred[:, j], actual[:, j])[0] for j in range(5)])


def tiny_head(n=9, f=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.cat([torch.randn(n, f - 1, generator=g, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1)
    w = torch.randn(c, f, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return a, w, y


def test_gauss_newton_equals_the_autograd_hessian_of_softmax_cross_entropy():
    a, w, y = tiny_head()
    loss = lambda flat: torch.nn.functional.cross_entropy(a @ flat.view_as(w).T, y)
    hessian = torch.autograd.functional.hessian(loss, w.flatten())
    torch.testing.assert_close(curvature.dense_gauss_newton(a, a @ w.T), hessian, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 9])
def test_eigenvalue_corrected_scores_equal_the_dense_computation(n):
    a, w, y = tiny_head(n=n)
    logits = a @ w.T
    d = torch.softmax(logits, 1) - torch.nn.functional.one_hot(y, 3).double()  # dL/dlogits per example
    curv = curvature.FcCurvature(a, logits, exact_max=0)  # the EK-FAC path
    q = torch.kron(curv.q_l, curv.q_a)
    h = curvature.dense_gauss_newton(a, logits)
    # s is the exact curvature along each product of eigenvectors
    torch.testing.assert_close(curv.s.flatten(), torch.diagonal(q.T @ h @ q), rtol=1e-9, atol=1e-12)
    lam = 0.1 * float(curv.s.mean())
    ekfac = q @ torch.diag(curv.s.flatten()) @ q.T + lam * torch.eye(len(h), dtype=torch.float64)
    g = (d[:, :, None] * a[:, None, :]).flatten(1)
    torch.testing.assert_close(curv.scores(a, d, a, d, 0.1), g @ torch.linalg.solve(ekfac, g.T), rtol=1e-8, atol=1e-10)
    if n == 1:  # one example: H is a Kronecker product, diagonal in those bases, and EK-FAC is exact
        exact = curvature.FcCurvature(a, logits)  # the dense path
        torch.testing.assert_close(curv.scores(a, d, a, d, 0.1), exact.scores(a, d, a, d, 0.1), rtol=1e-7, atol=1e-10)


def test_influence_predicts_leave_one_out_retraining_of_a_linear_model():
    """Softmax regression with an L2 term trained to convergence: the change of a test loss when a training example is
    left out is predicted by (1/n) g_test^T (H + l2 I)^{-1} g_j; Spearman over the examples > 0.9."""
    g = torch.Generator().manual_seed(3)
    n, f, c, l2 = 40, 5, 3, 1e-2
    x = torch.cat([torch.randn(n, f - 1, generator=g, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64)], 1)
    y = torch.randint(0, c, (n,), generator=g)
    y[:8] = (y[:8] + 1) % c  # some hard examples, so that removals matter
    x_te = torch.cat([torch.randn(6, f - 1, generator=g, dtype=torch.float64), torch.ones(6, 1, dtype=torch.float64)], 1)
    y_te = torch.randint(0, c, (6,), generator=g)

    def fit(keep):
        w = torch.zeros(c, f, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[keep] @ w.T, y[keep], reduction="sum") / n + 0.5 * l2 * (w ** 2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return w.detach()

    w = fit(torch.ones(n, dtype=torch.bool))
    curv = curvature.FcCurvature(x, x @ w.T)
    assert curv.dense is not None
    d = lambda xs, ys: torch.softmax(xs @ w.T, 1) - torch.nn.functional.one_hot(ys, c).double()
    damping = l2 / float(curv.s.mean())  # the damping is relative to the mean curvature
    scores = curv.scores(x_te, d(x_te, y_te), x, d(x, y), damping) / n  # (n_test, n_train)
    base = torch.nn.functional.cross_entropy(x_te @ w.T, y_te, reduction="none")
    actual = torch.stack([torch.nn.functional.cross_entropy(x_te @ fit(torch.arange(n) != j).T, y_te, reduction="none") - base
                          for j in range(n)], 1)  # (n_test, n_train): loss change when j is left out
    rho = [spearmanr(scores[t].numpy(), actual[t].numpy())[0] for t in range(len(y_te))]
    print("leave-one-out Spearman per test image:", np.round(rho, 3))
    assert min(rho) > 0.9, rho


def test_a_killed_lds_run_resumes_to_identical_records(prepared, trained, tmp_path, monkeypatch):
    base = ["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--num_subsets", "8", "--select_subsets", "3",
            "--n_test", "6", "--num_workers", "0", "--methods", "tracin", "influence"]
    saved, save = [], lds.SubsetStore.save

    def save_then_stop_at_three(self, *a, **kw):  # Ctrl-C once the third record is written
        save(self, *a, **kw)
        saved.append(1)
        if len(saved) == 3:
            raise KeyboardInterrupt("stopped by the test")

    with monkeypatch.context() as m:
        m.setattr(lds.SubsetStore, "save", save_then_stop_at_three)
        with pytest.raises(KeyboardInterrupt):
            lds.evaluate(lds.parse_args(base + ["--out_dir", str(tmp_path / "a")]))
    assert len(list((tmp_path / "a" / "subsets").glob("*.npz"))) == 3
    resumed = lds.evaluate(lds.parse_args(base + ["--out_dir", str(tmp_path / "a")]))
    fresh = lds.evaluate(lds.parse_args(base + ["--out_dir", str(tmp_path / "b")]))
    assert resumed["retrained_now"] == 5 and fresh["retrained_now"] == 8
    for j in range(8):
        za, zb = np.load(tmp_path / "a" / "subsets" / f"subset_{j:05d}.npz"), np.load(tmp_path / "b" / "subsets" / f"subset_{j:05d}.npz")
        for k in zb.files:
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
    assert resumed["methods"]["influence"]["lds"] == fresh["methods"]["influence"]["lds"]
    # another subset setting into the same folder is refused, not mixed in
    with pytest.raises(lds.UserError, match="another setting"):
        lds.evaluate(lds.parse_args(base + ["--out_dir", str(tmp_path / "a"), "--fraction", "0.3"]))


def test_full_retrain_records_each_subsets_model(prepared, trained, tmp_path):
    out = tmp_path / "full"
    r = lds.evaluate(lds.parse_args(["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--retrain", "full",
                                     "--epochs", "1", "--num_subsets", "3", "--select_subsets", "0", "--n_test", "6",
                                     "--num_workers", "0", "--methods", "tracin", "--out_dir", str(out)]))
    assert r["retrained_now"] == 3 and 0 <= r["subset_model_accuracy"] <= 1
    store = json.loads((out / "store.json").read_text())
    assert store["retrain"] == "full" and store["settings"]["epochs"] == 1
    for j in range(3):
        z = np.load(out / "subsets" / f"subset_{j:05d}.npz")
        assert len(z["train_idx"]) == 9 and np.isfinite(z["margin"]).all()  # half of the 18 training images
    assert not any((out / "work").iterdir())  # each retrain's checkpoints are removed once its margins are stored
    with pytest.raises(lds.UserError, match="--arch and --epochs"):
        lds.parse_args(["--epochs", "1"])


def test_shards_jobs_and_merge_give_the_records_of_one_run(prepared, trained, tmp_path):
    base = ["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--num_subsets", "6", "--select_subsets", "2",
            "--n_test", "6", "--num_workers", "0", "--methods", "tracin", "influence_last"]
    one = lds.evaluate(lds.parse_args(base + ["--out_dir", str(tmp_path / "one")]))
    assert lds.main(base + ["--out_dir", str(tmp_path / "sharded"), "--shard", "1/2"]) == 0  # subsets 1, 3, 5
    assert sorted(p.name for p in (tmp_path / "sharded" / "subsets").glob("*.npz")) == [f"subset_0000{j}.npz" for j in (1, 3, 5)]
    with pytest.raises(lds.UserError, match="3 of 6 subsets have no record"):
        lds.evaluate(lds.parse_args(base + ["--out_dir", str(tmp_path / "sharded"), "--merge"]))
    lds.main(base + ["--out_dir", str(tmp_path / "sharded"), "--shard", "0/2"])
    merged = lds.evaluate(lds.parse_args(base + ["--out_dir", str(tmp_path / "sharded"), "--merge"]))
    jobs = lds.evaluate(lds.parse_args(base + ["--out_dir", str(tmp_path / "jobs"), "--jobs", "2"]))
    assert merged["retrained_now"] == 0 and jobs["retrained_now"] == 6
    for j in range(6):
        want = np.load(tmp_path / "one" / "subsets" / f"subset_{j:05d}.npz")
        for other in ("sharded", "jobs"):
            got = np.load(tmp_path / other / "subsets" / f"subset_{j:05d}.npz")
            for k in want.files:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{other} {j} {k}")
    for r in (merged, jobs):
        assert r["methods"]["influence_last"]["lds"] == one["methods"]["influence_last"]["lds"]
    for bad in (["--shard", "2/2"], ["--shard", "x"], ["--shard", "0/2", "--merge"]):
        with pytest.raises((SystemExit, lds.UserError)):
            lds.parse_args(base + bad)


@pytest.mark.parametrize("argv,needle", [
    (["--num_subsets", "1"], "leaves 1 subset(s) to report"),
    (["--num_subsets", "4", "--select_subsets", "2"], "leaves 2 subset(s) to report"),
    (["--fraction", "1"], "--fraction 1"),
    (["--num_subsets", "8", "--jobs", "9"], "--jobs 9"),
])
def test_lds_settings_that_leave_nothing_to_report_are_refused(argv, needle):
    from lib.cli import UserError

    with pytest.raises(UserError, match=None) as e:
        lds.parse_args(argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_too_few_selection_subsets_report_the_default_damping_not_the_first_grid_value():
    rng = np.random.default_rng(0)
    masks = rng.random((8, 6)) < 0.5
    margins = rng.normal(size=(8, 3))
    by_damping = {lam: rng.normal(size=(3, 6)) for lam in (1e-6, 10.0, 1e4)}
    few = lds_score.choose_damping(by_damping, masks, margins, 2, 50, 0, default=10.0)
    assert few["damping"] == 10.0 and few["damping_chosen"] is False
    enough = lds_score.choose_damping(by_damping, masks, margins, 4, 50, 0, default=10.0)
    best = max(by_damping, key=lambda lam: np.nanmean(lds_score.lds(by_damping[lam], masks[:4], margins[:4])))
    assert enough["damping"] == best and enough["damping_chosen"] is True


def test_a_truncated_or_incomplete_record_is_one_line(tmp_path):
    """A truncated subset record (BadZipFile before) or training_dynamics.npz: one line naming the file."""
    from lib.cli import UserError
    from lib.training_dynamics import FILE, load_dynamics

    store = lds.SubsetStore(tmp_path / "lds", {"x": 1})
    store.save(0, np.arange(4), np.zeros(3), np.zeros(3), 0.5)
    assert store.load(0)["train_idx"].tolist() == [0, 1, 2, 3]
    data = store.path(0).read_bytes()
    store.path(0).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="subset_00000.npz") as e:
        store.load(0)
    assert "\n" not in str(e.value)
    np.savez(store.path(1), train_idx=np.arange(2))  # a record without margins
    with pytest.raises(UserError, match="lacks margin"):
        store.load(1)
    (tmp_path / FILE).write_bytes(data[:40])
    with pytest.raises(UserError, match=FILE):
        load_dynamics(tmp_path, 4, ["a", "b"])


def _children(pid: int) -> list[int]:
    import subprocess

    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_a_killed_lds_takes_its_train_py_with_it_and_a_failed_run_does_not_lock_its_folder(prepared, trained, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "full"
    base = ["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--retrain", "full", "--epochs", "1",
            "--num_subsets", "3", "--select_subsets", "0", "--n_test", "6", "--num_workers", "0", "--methods", "tracin",
            "--out_dir", str(out)]
    # a bad --arch fails in the first retrain; the folder then takes the corrected run (it held no record)
    bad = subprocess.run([sys.executable, "-m", "TracIn.lds", *base, "--arch", "resnet9000"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    parent = subprocess.Popen([sys.executable, "-m", "TracIn.lds", *base], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, kids = time.time() + 120, []
    while time.time() < deadline and not kids:
        kids = _children(parent.pid)
        time.sleep(0.2)
    assert kids, "no train.py child started"
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{k}") and open(f"/proc/{k}/stat").read().split()[2] != "Z"
                                         for k in kids):
        time.sleep(0.2)
    alive = [k for k in kids if os.path.exists(f"/proc/{k}") and open(f"/proc/{k}/stat").read().split()[2] != "Z"]
    assert not alive, f"train.py {alive} outlived its killed parent"


@pytest.mark.parametrize("retrain,fraction,needle", [("head", "0.01", "is 0 per subset"), ("head", "0.99", "is 18 per subset"),
                                                     ("full", "0.06", "is 1 per subset")])
def test_subsets_that_cannot_give_a_finite_lds_are_refused_before_any_retrain(prepared, trained, tmp_path, monkeypatch,
                                                                               retrain, fraction, needle):
    """--fraction 0.01 of 18 training images is no image per subset (every prediction 0) and 0.99 every image (every
    subset the same): every LDS would be NaN, so nothing is retrained; a full retrain (train.py) needs 2 images."""
    def no_retrain(*a, **kw):
        raise AssertionError("retrained")

    monkeypatch.setattr(lds, "fill_store", no_retrain)
    monkeypatch.setattr(lds, "retrain_in_processes", no_retrain)
    argv = ["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--num_subsets", "8", "--n_test", "6",
            "--num_workers", "0", "--methods", "tracin", "--fraction", fraction, "--retrain", retrain, "--out_dir",
            str(tmp_path / "lds")]
    with pytest.raises(lds.UserError) as e:
        lds.evaluate(lds.parse_args(argv))
    assert needle in str(e.value) and "NaN" in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "lds").exists()
    from TracIn.experiments.lds_score import check_subset_size

    assert check_subset_size(18, 0.5) == 9 and check_subset_size(18, 1 / 18) == 1 and check_subset_size(18, 17 / 18) == 17
    with pytest.raises(lds.UserError, match="too few"):
        check_subset_size(2, 0.5, min_size=2)
