"""The training library (training.py) and the retraining one (TracIn/experiments/retraining.py) through their API."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lib.training import example_figures, fit
from TracIn.experiments.retraining import Arm, Retrainer, retrain_head, run_arms


def test_fit_is_the_plain_minibatch_loop_with_the_scheduled_rate():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(23, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (23,), generator=g)
    w0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    rates = {1: 0.5, 2: 0.1, 3: 0.02}
    orders = {e: torch.randperm(23, generator=g) for e in rates}

    # the reference: SGD written out by hand, batches of 5 (the last one ragged)
    w = w0.clone()
    for e in rates:
        for b in range(0, 23, 5):
            i = orders[e][b:b + 5]
            p = torch.softmax(x[i] @ w.T, 1)
            grad = (p - F.one_hot(y[i], 3).double()).T @ x[i] / len(i)
            w = w - rates[e] * grad

    v = w0.clone().requires_grad_()
    opt = torch.optim.SGD([v], lr=123.0)  # fit sets the rate each epoch
    seen = []

    def step(xb, yb):
        logits = xb @ v.T
        return logits, F.cross_entropy(logits, yb)

    def batches(epoch):
        for b in range(0, 23, 5):
            i = orders[epoch][b:b + 5]
            yield x[i], y[i], i

    fit(step, opt, batches, 3, rates.get, on_epoch=lambda e, lr, s: seen.append((e, lr, s.seen, s.loss_sum)))
    torch.testing.assert_close(v.detach(), w, rtol=1e-12, atol=1e-12)
    assert [(e, lr, n) for e, lr, n, _ in seen] == [(1, 0.5, 23.0), (2, 0.1, 23.0), (3, 0.02, 23.0)]
    assert all(np.isfinite(s) and s > 0 for *_, s in seen)


def test_fit_resumes_from_a_later_epoch_and_reports_batches():
    v = torch.zeros(2, 2, requires_grad=True)
    opt = torch.optim.SGD([v], lr=1.0)
    calls = []
    batch = (torch.ones(3, 2), torch.tensor([0, 1, 1]), torch.arange(3))

    def step(xb, yb):
        logits = xb @ v.T
        return logits, F.cross_entropy(logits, yb)

    fit(step, opt, lambda e: [batch, batch], 4, lambda e: 0.1 * e, start_epoch=3,
        on_batch=lambda idx, logits, yb, loss: calls.append((opt.param_groups[0]["lr"], logits.shape)))
    assert calls == [(pytest.approx(0.3), (3, 2))] * 2 + [(pytest.approx(0.4), (3, 2))] * 2


def test_example_figures_match_their_definitions():
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(2, 7, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (7,), generator=g)
    loss, margin, el2n = example_figures(z, y)
    for k in range(2):
        torch.testing.assert_close(loss[k], F.cross_entropy(z[k], y, reduction="none"))
        for i in range(7):
            others = [z[k, i, c] for c in range(5) if c != y[i]]
            assert margin[k, i].item() == pytest.approx((z[k, i, y[i]] - max(others)).item())
            onehot = torch.zeros(5, dtype=torch.float64)
            onehot[y[i]] = 1
            assert el2n[k, i].item() == pytest.approx((torch.softmax(z[k, i], 0) - onehot).norm().item())


class Listing:
    def __init__(self, labels):
        self.labels = np.asarray(labels)
        self.paths = [f"img{i}.png" for i in range(len(labels))]


def test_head_arms_leave_out_the_original_exclusions_and_run_arms_records_each():
    g = torch.Generator().manual_seed(2)
    x_train = torch.cat([torch.randn(30, 4, generator=g, dtype=torch.float64), torch.ones(30, 1, dtype=torch.float64)], 1)
    x_test = torch.cat([torch.randn(6, 4, generator=g, dtype=torch.float64), torch.ones(6, 1, dtype=torch.float64)], 1)
    labels = np.arange(30) % 3
    settings = {"learning_rate": 1e-2, "weight_decay": 0.0, "batch_size": 8, "epochs": 2, "lr_schedule": "cosine", "seed": 0}
    retrainer = Retrainer("head", settings, "unused", Listing(labels), np.array([4]), "unused", "unused", "test",
                          features=(x_train, x_test))
    arm = Arm("a", np.array([0, 1]), seed=7, labels={"method": "m"})
    assert retrainer.left_out(arm).tolist() == [0, 1, 4]
    keep = np.ones(30, dtype=bool)
    keep[[0, 1, 4]] = False
    want = (x_test @ retrain_head(x_train, labels, keep, settings, 7).T).numpy()
    rows = run_arms([arm, Arm("b", np.zeros(0, dtype=np.int64), seed=7, labels={"method": "none"})],
                    lambda a: {"logits": retrainer.test_logits(a)})
    np.testing.assert_array_equal(rows[0]["logits"], want)
    assert rows[0]["method"] == "m" and rows[1]["method"] == "none" and all(r["seconds"] >= 0 for r in rows)
    assert not np.array_equal(rows[1]["logits"], want)  # image 0 and 1 back in: another model
    with pytest.raises(ValueError, match="features"):
        Retrainer("head", settings, "unused", Listing(labels), np.array([4]), "unused", "unused", "test")
