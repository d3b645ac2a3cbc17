"""The slow, obviously-correct TracIn the fast paths are tested against: per-example gradients with torch.func.

    from reference import reference_influence
    scores = reference_influence(models, lrs, ["fc.weight", "fc.bias"], x_tr, y_tr, x_te, y_te)   # (n_test, n_train)
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def per_example_grads(model: nn.Module, params: Iterable[str], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Flattened per-example gradients of cross-entropy w.r.t. the named parameters, (n, P).

    torch.func (functional_call + vmap(grad)): the obviously-correct, memory-hungry path.
    The model must be in eval mode (batch norm uses running statistics, as in the fast path).
    """
    from torch.func import functional_call, grad, vmap

    names = list(params)
    all_params = dict(model.named_parameters())
    chosen = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in chosen}
    buffers = dict(model.named_buffers())

    def loss_fn(p, xi, yi):
        out = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_fn), in_dims=(None, 0, 0))(chosen, x, y)
    return torch.cat([grads[n].reshape(x.shape[0], -1) for n in names], dim=1)


def reference_influence(models: Sequence[nn.Module], lr_weights: Sequence[float], params: Sequence[str],
                        x_train, y_train, x_test, y_test) -> torch.Tensor:
    """(n_test, n_train) TracIn scores from materialised per-example gradients."""
    total = 0
    for model, lr in zip(models, lr_weights):
        g_tr = per_example_grads(model, params, x_train, y_train)
        g_te = per_example_grads(model, params, x_test, y_test)
        total = total + lr * (g_te @ g_tr.T)
    return total
