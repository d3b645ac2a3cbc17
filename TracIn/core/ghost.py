"""The ghost dot-product: per-example factor capture (InfluenceHook, its projections) and the products over factors.

    from TracIn.core.ghost import InfluenceHook, ghost_influence_block, target_layers
    with InfluenceHook(model, target_layers(model, ["fc"])) as hook:
        factors, logits, _ = hook.factors(x, y)                       # {layer: (A, D)}, no gradient materialised
    scores = ghost_influence_block([test_factors], [factors], [lr])    # (n_test, n_train)

The streaming top-k is in topk.py; the float64 torch.func reference these are tested against is tests/reference.py.

TracIn (Pruthi et al., NeurIPS 2020, eq. 2 with checkpoints):

    influence(z_i, z_j) = sum_t lr_t * <grad_theta L(z_i; theta_t), grad_theta L(z_j; theta_t)>

For a linear layer y = W a + b the per-example gradient of W is d a^T with d = dL/dy, so

    <g_i, g_j> = (a_i . a_j) (d_i . d_j)      ("ghost" dot-product; the bias adds d_i . d_j,
                                              handled by appending a constant 1 to a)

and no per-example gradient is ever materialised.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


SUPPORTED = (nn.Linear, nn.Conv2d)
SUPPORTED_NAMES = "nn.Linear, nn.Conv2d (groups=1)"


def target_layers(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Module names -> the supported layers they name, in model order: a Linear/Conv2d itself, or every
    Linear/Conv2d inside a container (`layer4` -> all convolutions of ResNet's layer4). ValueError
    names the first name that is missing or holds no supported layer."""
    modules = dict(model.named_modules())
    out = set()
    for name in names:
        m = modules.get(name)
        if m is None or name == "":
            top = [n for n in modules if n and "." not in n]
            raise ValueError(f"no layer named {name!r} in the model (top-level modules: {', '.join(top)})")
        inside = [name] if isinstance(m, SUPPORTED) else [f"{name}.{n}" for n, c in m.named_modules() if n and isinstance(c, SUPPORTED)]
        if not inside:
            raise ValueError(f"layer {name!r} is a {type(m).__name__}, not a supported type ({SUPPORTED_NAMES}), "
                             "and holds none")
        bad = [n for n in inside if isinstance(modules[n], nn.Conv2d) and modules[n].groups != 1]
        if bad:
            raise ValueError(f"layer {bad[0]!r} is a grouped convolution; supported: {SUPPORTED_NAMES}")
        out.update(inside)
    order = {n: i for i, n in enumerate(modules)}
    return sorted(out, key=order.__getitem__)


def _stable_seed(*keys) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(":".join(map(str, keys)).encode()).digest()[:8], "little") >> 1


def projection(width: int, r: int, seed: int, layer: str, side: str) -> torch.Tensor | None:
    """A (r, width) Gaussian matrix with N(0, 1/r) entries, so E[R^T R] = I, from a seed fixed by
    (seed, layer, side): train and test factors of one run always share it. None (the identity) when
    r = 0 or r >= width."""
    if r == 0 or r >= width:
        return None
    g = torch.Generator().manual_seed(_stable_seed(seed, layer, side, r, width))
    return torch.randn(r, width, generator=g, dtype=torch.float64) / math.sqrt(r)


class InfluenceHook:
    """Capture per-example gradient factors of target layers (nn.Linear and nn.Conv2d).

    Use as a context manager: parameters are frozen while it is active (restored on exit),
    and the first target layer that runs detaches its input and starts the autograd graph
    there, so with only the head targeted no backward pass touches the backbone.

        with InfluenceHook(model, ["fc"]) as hook:
            factors = hook.factors(x, y)   # {"fc": (A, D)}

    Every layer gives a pair (A, D) whose ghost product (A_i . A_j)(D_i . D_j) is the gradient dot product:
    - nn.Linear (exact, the default): A = input a (n, d_in[+1], the bias as a constant 1), D = output error d.
    - nn.Conv2d, and nn.Linear with project_linear: the per-example weight gradient G = sum_p d_p u_p^T over
      output positions p (u_p the unfolded input patch, with a 1 for the bias) is projected from both sides,
      P = R_out G R_in^T = sum_p (R_out d_p)(R_in u_p)^T, never forming G; A = P flattened (n, r_out * r_in)
      and D = a column of ones. E[<P_i, P_j>] = <G_i, G_j> (Gaussian R with N(0, 1/r) entries); a side whose
      width is <= proj_dim (or proj_dim 0) is not projected, so proj_dim 0 gives the exact gradient.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], proj_dim: int = 0, proj_seed: int = 0,
                 project_linear: bool = False):
        modules = dict(model.named_modules())
        missing = [name for name in layers if not isinstance(modules.get(name), SUPPORTED)
                   or (isinstance(modules[name], nn.Conv2d) and modules[name].groups != 1)]
        if missing:
            raise ValueError(f"layer(s) {', '.join(missing)} are not nn.Linear or nn.Conv2d (groups=1) modules of the model; "
                             f"supported types: {SUPPORTED_NAMES}")
        self.model = model
        self.layers = list(layers)
        self._modules = {name: modules[name] for name in self.layers}
        self.projected = {n: isinstance(m, nn.Conv2d) or project_linear for n, m in self._modules.items()}
        self.proj, self.dims = {}, {}
        for name, m in self._modules.items():
            out_w = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            in_w = (m.in_features if isinstance(m, nn.Linear) else m.in_channels * math.prod(m.kernel_size)) + (m.bias is not None)
            if not self.projected[name]:
                self.dims[name] = (in_w, out_w)
                continue
            if proj_dim > max(in_w, out_w):
                raise ValueError(f"--proj_dim {proj_dim} is larger than layer {name}'s width ({out_w} outputs, {in_w} "
                                 "inputs per position); use at most the larger, or 0 for the exact gradient")
            r_out, r_in = projection(out_w, proj_dim, proj_seed, name, "out"), projection(in_w, proj_dim, proj_seed, name, "in")
            self.proj[name] = (r_out, r_in)
            self.dims[name] = ((out_w if r_out is None else r_out.shape[0]) * (in_w if r_in is None else r_in.shape[0]), 1)
        self._handles: list = []
        self._inputs: dict[str, torch.Tensor] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._requires_grad: dict[str, bool] = {}
        self._cast: dict = {}

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
            if isinstance(module, nn.Linear) and a.dim() != 2:
                raise ValueError(f"layer {name} gets input of shape {tuple(a.shape)}; only (batch, features) inputs are supported")
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
        out = {name: self._factor(name) for name in self.layers}
        self._inputs.clear()
        self._grads.clear()
        return out, logits.detach(), losses.detach()

    def _matrix(self, name: str, side: int, like: torch.Tensor):
        r = self.proj[name][side]
        if r is None:
            return None
        key = (name, side, like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = r.to(device=like.device, dtype=like.dtype)
        return self._cast[key]

    def _factor(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        module, a, d = self._modules[name], self._inputs[name], self._grads[name]
        n = a.shape[0]
        if isinstance(module, nn.Conv2d):
            u = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
            d = d.reshape(n, d.shape[1], -1)  # (n, C_out, L): one column per output position
        else:
            u, d = a.unsqueeze(-1), d.unsqueeze(-1)  # a linear layer: one position
        if module.bias is not None:
            u = torch.cat([u, u.new_ones(n, 1, u.shape[-1])], dim=1)
        if not self.projected[name]:
            return u.squeeze(-1), d.squeeze(-1)
        r_out, r_in = self._matrix(name, 0, d), self._matrix(name, 1, u)
        pd = d if r_out is None else torch.matmul(r_out, d)  # (n, r_out, L)
        pu = u if r_in is None else torch.matmul(r_in, u)    # (n, r_in, L)
        p = torch.bmm(pd, pu.transpose(1, 2)).reshape(n, -1)  # sum over positions of the projected outer products
        return p, p.new_ones(n, 1)


Factors = dict  # {layer: (A, D)} for one checkpoint


def ghost_dot(a_te: torch.Tensor, d_te: torch.Tensor, a_tr: torch.Tensor, d_tr: torch.Tensor) -> torch.Tensor:
    """(n_te, n_tr) gradient dot-products of one linear layer: (A_te A_tr^T) * (D_te D_tr^T)."""
    return (a_te @ a_tr.T).mul_(d_te @ d_tr.T)


def ghost_influence_block(test_factors: Sequence[Factors], train_factors: Sequence[Factors],
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
