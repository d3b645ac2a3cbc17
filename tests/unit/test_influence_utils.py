"""The ghost dot-product path against torch.func per-example gradients, and streaming top-k."""
import gc
import tracemalloc

import pytest
import torch

from helpers import make_tiny_models
from TracIn.core.topk import TopKInfluenceTracker
from reference import per_example_grads, reference_influence
from TracIn.influence_utils import InfluenceHook, ghost_influence_block, self_influence  # the seed's import path


def ghost_scores(models, lrs, layers, x_tr, y_tr, x_te, y_te, batch=4):
    """Fast path over train batches of `batch` (11 train examples: not divisible)."""
    te, tr = [], []
    for m in models:
        with InfluenceHook(m, layers) as hook:
            te.append(hook.factors(x_te, y_te)[0])
            parts = [hook.factors(x_tr[i:i + batch], y_tr[i:i + batch])[0] for i in range(0, len(x_tr), batch)]
        tr.append({l: tuple(torch.cat([p[l][j] for p in parts]) for j in range(2)) for l in layers})
    return ghost_influence_block(te, tr, lrs), tr


def data(n, seed, dtype=torch.float64, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 5, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("layers", [["fc"], ["fc", "fc1"]])
def test_ghost_equals_torch_func_reference_float64(layers):
    models = make_tiny_models(3)
    lrs = [0.1, 0.03, 0.5]
    x_tr, y_tr = data(11, 1)
    x_te, y_te = data(5, 2)
    fast, tr = ghost_scores(models, lrs, layers, x_tr, y_tr, x_te, y_te)
    params = [f"{l}.{p}" for l in layers for p in ("weight", "bias")]
    ref = reference_influence(models, lrs, params, x_tr, y_tr, x_te, y_te)
    assert fast.shape == (5, 11) and fast.dtype == torch.float64
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-12)
    # self-influence: sum_t lr_t |g_t|^2
    ref_self = sum(lr * per_example_grads(m, params, x_tr, y_tr).pow(2).sum(1) for m, lr in zip(models, lrs))
    torch.testing.assert_close(self_influence(tr, lrs), ref_self, rtol=1e-6, atol=1e-12)


def test_hook_releases_handles_restores_grad_flags_and_does_not_mutate_input():
    (m,) = make_tiny_models(1)
    m.conv.weight.requires_grad_(False)  # a caller's own freezing must survive
    x, y = data(4, 3)
    x0 = x.clone()
    with InfluenceHook(m, ["fc"]) as hook:
        (a, d), = hook.factors(x, y)[0].values()
        assert not any(p.requires_grad for p in m.parameters())
    assert a.shape == (4, 8) and d.shape == (4, 3)  # 7 inputs + bias column
    torch.testing.assert_close(a[:, -1], torch.ones(4, dtype=a.dtype))
    assert torch.equal(x, x0)
    assert not m.fc._forward_hooks and not m.fc._forward_pre_hooks
    assert m.fc.weight.requires_grad and not m.conv.weight.requires_grad
    assert all(p.grad is None for p in m.parameters())


def test_head_only_hook_runs_no_backward_through_backbone():
    (m,) = make_tiny_models(1)
    calls = []
    m.conv.register_full_backward_hook(lambda *a: calls.append("conv"))
    m.fc1.register_full_backward_hook(lambda *a: calls.append("fc1"))
    with InfluenceHook(m, ["fc"]) as hook:
        hook.factors(*data(3, 4))
    assert calls == []


def test_hook_rejects_unsupported_layer():
    (m,) = make_tiny_models(1)
    with pytest.raises(ValueError, match="not nn.Linear or nn.Conv2d"):
        InfluenceHook(m, ["bn"])


def test_hook_memory_does_not_grow_over_repeated_use():
    (m,) = make_tiny_models(1)
    x, y = data(16, 5)
    with InfluenceHook(m, ["fc", "fc1"]) as hook:
        for _ in range(5):
            hook.factors(x, y)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(50):
            hook.factors(x, y)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
    assert grown < 200_000, grown
    assert not hook._inputs and not hook._grads


@pytest.mark.parametrize("n_train,block,k", [(37, 8, 5), (50, 50, 50), (23, 7, 1)])
def test_streaming_topk_equals_full_topk(n_train, block, k):
    g = torch.Generator().manual_seed(n_train)
    full = torch.randn(9, n_train, generator=g)
    tracker = TopKInfluenceTracker(9, k)
    for s in range(0, n_train, block):
        tracker.update(full[:, s:s + block], torch.arange(s, min(s + block, n_train)))
    v, i = tracker.proponents()
    ev, ei = torch.topk(full, k, dim=1)
    assert torch.equal(v, ev) and torch.equal(i, ei)
    v, i = tracker.opponents()
    ev, ei = torch.topk(-full, k, dim=1)
    assert torch.equal(v, -ev) and torch.equal(i, ei)
    assert (v[:, :-1] <= v[:, 1:]).all()  # most negative first


def test_streaming_topk_row_blocks():
    full = torch.randn(10, 30, generator=torch.Generator().manual_seed(0))
    tracker = TopKInfluenceTracker(10, 4)
    for r in (slice(0, 3), slice(3, 10)):
        for s in range(0, 30, 11):
            tracker.update(full[r, s:s + 11], torch.arange(s, min(s + 11, 30)), rows=r)
    assert torch.equal(tracker.proponents()[1], torch.topk(full, 4, dim=1).indices)


def test_sharded_trackers_merge_to_unsharded():
    full = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    whole = TopKInfluenceTracker(6, 5)
    whole.update(full, torch.arange(40))
    a, b = TopKInfluenceTracker(6, 5), TopKInfluenceTracker(6, 5)
    a.update(full[:, :13], torch.arange(13))
    b.update(full[:, 13:], torch.arange(13, 40))
    merged = a.merge(b)
    for got, want in zip(merged.proponents() + merged.opponents(), whole.proponents() + whole.opponents()):
        assert torch.equal(got, want)
    restored = TopKInfluenceTracker.from_state(merged.state())
    assert torch.equal(restored.opponents()[1], whole.opponents()[1])
