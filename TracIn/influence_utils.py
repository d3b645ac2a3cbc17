"""TracIn building blocks: per-example factor capture, ghost dot-products, streaming top-k.

TracIn (Pruthi et al., NeurIPS 2020, eq. 2 with checkpoints):

    influence(z_i, z_j) = sum_t lr_t * <grad_theta L(z_i; theta_t), grad_theta L(z_j; theta_t)>

For a linear layer y = W a + b the per-example gradient of W is d a^T with d = dL/dy, so

    <g_i, g_j> = (a_i . a_j) (d_i . d_j)      ("ghost" dot-product; the bias adds d_i . d_j,
                                              handled by appending a constant 1 to a)

and no per-example gradient is ever materialised. `reference_influence` is the slow,
obviously-correct version (torch.func per-example gradients) that the tests hold this to.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


def linear_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


class InfluenceHook:
    """Capture, per target nn.Linear, the inputs a (n, d_in[+1]) and output errors d (n, d_out).

    Use as a context manager: parameters are frozen while it is active (restored on exit),
    and the first target layer that runs detaches its input and starts the autograd graph
    there, so with only the head targeted no backward pass touches the backbone.

        with InfluenceHook(model, ["fc"]) as hook:
            factors = hook.factors(x, y)   # {"fc": (A, D)}

    The bias column (a constant 1 appended to a) is included when the layer has a bias.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [name for name in layers if not isinstance(modules.get(name), nn.Linear)]
        if missing:
            raise ValueError(f"layer(s) {', '.join(missing)} are not nn.Linear modules of the model; "
                             f"linear layers: {', '.join(linear_layers(model)) or 'none'}")
        self.model = model
        self.layers = list(layers)
        self._modules = {name: modules[name] for name in self.layers}
        self._handles: list = []
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._requires_grad: dict[str, bool] = {}

    # ---- lifecycle
    def __enter__(self) -> "InfluenceHook":
        self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(module.register_forward_hook(self._make_forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self.release()  # exceptions propagate

    def release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for n, p in self.model.named_parameters():
            if n in self._requires_grad:
                p.requires_grad_(self._requires_grad[n])
        self._requires_grad = {}
        self._inputs.clear()
        self._grads.clear()

    # ---- hooks
    @staticmethod
    def _pre_hook(module, inputs):
        (x,) = inputs
        if not x.requires_grad:
            # Start the graph here: the backbone before the first target layer ran without one.
            return (x.detach().requires_grad_(True),)
        return None

    def _make_forward_hook(self, name: str):
        def hook(module, inputs, output):
            a = inputs[0].detach()
            if a.dim() != 2:
                raise ValueError(f"layer {name} gets input of shape {tuple(a.shape)}; only (batch, features) inputs are supported")
            if module.bias is not None:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
            self._inputs[name] = a

            def save_grad(g):
                self._grads[name] = g.detach()

            output.register_hook(save_grad)

        return hook

    # ---- use
    def factors(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Forward + backward of the summed per-example cross-entropy.

        Returns:
            ({layer: (A (n, d_in[+1]), D (n, d_out))}, logits (n, C), per-example loss (n,)).
        """
        self._inputs.clear()
        self._grads.clear()
        with torch.enable_grad():
            logits = self.model(x)
            losses = F.cross_entropy(logits, y, reduction="none")
            losses.sum().backward()
        out = {name: (self._inputs[name], self._grads[name]) for name in self.layers}
        self._inputs.clear()
        self._grads.clear()
        return out, logits.detach(), losses.detach()


Factors = dict  # {layer: (A, D)} for one checkpoint


def ghost_dot(a_te: torch.Tensor, d_te: torch.Tensor, a_tr: torch.Tensor, d_tr: torch.Tensor) -> torch.Tensor:
    """(n_te, n_tr) gradient dot-products of one linear layer: (A_te A_tr^T) * (D_te D_tr^T)."""
    return (a_te @ a_tr.T).mul_(d_te @ d_tr.T)


def compute_ghost_influence_batch(test_factors: Sequence[Factors], train_factors: Sequence[Factors],
                                  lr_weights: Sequence[float]) -> torch.Tensor:
    """TracIn scores of a (test block, train block): sum_t lr_t sum_l ghost_dot.

    Args:
        test_factors / train_factors: one {layer: (A, D)} dict per checkpoint.
        lr_weights: lr_t per checkpoint.
    Returns:
        (n_test, n_train) tensor in the factors' dtype.
    """
    if not (len(test_factors) == len(train_factors) == len(lr_weights)):
        raise ValueError("one factor set and one lr weight per checkpoint are needed")
    total = None
    for te, tr, lr in zip(test_factors, train_factors, lr_weights):
        for layer in te:
            s = ghost_dot(*te[layer], *tr[layer])
            total = s.mul_(lr) if total is None else total.add_(s, alpha=lr)
    return total


def self_influence(factors: Sequence[Factors], lr_weights: Sequence[float]) -> torch.Tensor:
    """sum_t lr_t |g_t(z_i)|^2 = sum_t lr_t sum_l |a_i|^2 |d_i|^2, shape (n,)."""
    total = None
    for f, lr in zip(factors, lr_weights):
        for a, d in f.values():
            s = (a * a).sum(1) * (d * d).sum(1) * lr
            total = s if total is None else total + s
    return total


class TopKInfluenceTracker:
    """Streaming per-test-row top-k of proponents (largest) and opponents (smallest) scores.

    Memory is O(n_test * k) whatever the number of training examples. Blocks of scores
    arrive with the global training indices of their columns; each update is one concat
    + topk on tensors. Trackers over disjoint training shards `merge` into exactly the
    tracker of the union.
    """

    def __init__(self, n_test: int, k: int, device="cpu", dtype=torch.float32):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.n_test, self.k = n_test, k
        self.prop_values = torch.full((n_test, k), -float("inf"), device=device, dtype=dtype)
        self.prop_indices = torch.full((n_test, k), -1, device=device, dtype=torch.long)
        # opponents kept as the top-k of the negated scores
        self.opp_values = torch.full((n_test, k), -float("inf"), device=device, dtype=dtype)
        self.opp_indices = torch.full((n_test, k), -1, device=device, dtype=torch.long)

    @staticmethod
    def _merge(values, indices, new_values, new_indices, k):
        v = torch.cat([values, new_values], dim=1)
        i = torch.cat([indices, new_indices], dim=1)
        top_v, pos = torch.topk(v, k, dim=1)
        return top_v, torch.gather(i, 1, pos)

    def update(self, scores: torch.Tensor, train_indices: torch.Tensor, rows: slice | None = None) -> None:
        """scores: (n_rows, n_block); train_indices: (n_block,) global indices of the columns."""
        rows = rows if rows is not None else slice(0, self.n_test)
        scores = scores.to(self.prop_values.dtype)
        idx = train_indices.to(self.prop_indices.device).view(1, -1).expand(scores.shape[0], -1)
        kk = min(self.k, scores.shape[1])
        # pre-select the block's own top-k before merging: cheap and keeps the concat small
        bv, bp = torch.topk(scores, kk, dim=1)
        self.prop_values[rows], self.prop_indices[rows] = self._merge(
            self.prop_values[rows], self.prop_indices[rows], bv, torch.gather(idx, 1, bp), self.k)
        bv, bp = torch.topk(-scores, kk, dim=1)
        self.opp_values[rows], self.opp_indices[rows] = self._merge(
            self.opp_values[rows], self.opp_indices[rows], bv, torch.gather(idx, 1, bp), self.k)

    def merge(self, other: "TopKInfluenceTracker") -> "TopKInfluenceTracker":
        """In place: the tracker of the union of both trackers' training examples."""
        if (other.n_test, other.k) != (self.n_test, self.k):
            raise ValueError("trackers cover different test sets or k")
        self.prop_values, self.prop_indices = self._merge(self.prop_values, self.prop_indices,
                                                          other.prop_values.to(self.prop_values), other.prop_indices.to(self.prop_indices), self.k)
        self.opp_values, self.opp_indices = self._merge(self.opp_values, self.opp_indices,
                                                        other.opp_values.to(self.opp_values), other.opp_indices.to(self.opp_indices), self.k)
        return self

    def proponents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values descending, indices), each (n_test, k)."""
        return self.prop_values, self.prop_indices

    def opponents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values ascending: most negative first, indices), each (n_test, k)."""
        return -self.opp_values, self.opp_indices

    def state(self) -> dict:
        return {"prop_values": self.prop_values.cpu(), "prop_indices": self.prop_indices.cpu(),
                "opp_values": self.opp_values.cpu(), "opp_indices": self.opp_indices.cpu()}

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> "TopKInfluenceTracker":
        n_test, k = state["prop_values"].shape
        t = cls(n_test, k, device=device, dtype=state["prop_values"].dtype)
        for name in ("prop_values", "prop_indices", "opp_values", "opp_indices"):
            setattr(t, name, torch.as_tensor(state[name]).to(device))
        return t


# ---------------------------------------------------------------- slow reference
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
