"""Curvature-aware scores of efficient_tracin (--score_fn influence, influence_last, trak) against a slow reference:
per-example fc gradients from torch.func in float64, the K-FAC / TRAK matrices built densely and solved."""
import numpy as np
import pytest
import torch

from lib.checkpoints import load_checkpoint, model_from_checkpoint
from lib.cli import UserError
from lib.data_utils import ImageListDataset, build_transform, list_split
from helpers import make_random_checkpoints, tiny_resnet_batch, tiny_resnets
from TracIn import efficient_tracin as et
from TracIn.core.arguments import TracInConfig
from TracIn.core.curvature import KroneckerCurvature
from TracIn.core.job import tracin_job
from reference import per_example_grads
from TracIn.core.ghost import InfluenceHook, ghost_influence_block


@pytest.fixture(scope="module")
def ckpts(prepared, tmp_path_factory):
    return make_random_checkpoints(tmp_path_factory.mktemp("ckpt"), list_split(prepared, "train").class_names, n=2,
                                   lrs=(0.01, 0.004))


def split_tensors(prepared, split):
    ds = ImageListDataset(list_split(prepared, split), build_transform(32, train=False))
    return torch.stack([ds[i][0] for i in range(len(ds))]).double(), torch.tensor([ds[i][1] for i in range(len(ds))])


def fc_gradients(model, x, y):
    """Per-example gradients of [W | b] of fc, (n, C (F + 1)) in W's row-major order, its inputs a (n, F + 1) and logits."""
    g = per_example_grads(model, ["fc.weight", "fc.bias"], x, y)
    c, f = model.fc.weight.shape
    g = torch.cat([g[:, :c * f].reshape(-1, c, f), g[:, c * f:, None]], 2).flatten(1)
    seen = {}
    h = model.fc.register_forward_hook(lambda m, i, o: seen.update(a=i[0]))
    with torch.no_grad():
        logits = model(x)
    h.remove()
    return g, torch.cat([seen["a"], torch.ones(len(x), 1, dtype=x.dtype)], 1), logits


def reference(prepared, ckpts, score_fn, damping, trak_dim=2048):
    """(n_test, n_train) scores from materialised gradients and dense curvature, float64."""
    x_tr, y_tr = split_tensors(prepared, "train")
    x_te, y_te = split_tensors(prepared, "test")
    steps = [len(ckpts) - 1] if score_fn.endswith("_last") else range(len(ckpts))
    total = 0
    for t in steps:
        ckpt = load_checkpoint(ckpts[t])
        model = model_from_checkpoint(ckpt).double().eval()
        g_tr, a_tr, logits_tr = fc_gradients(model, x_tr, y_tr)
        g_te, _, logits_te = fc_gradients(model, x_te, y_te)
        if score_fn.startswith("influence"):
            p = torch.softmax(logits_tr, 1)
            d_factor = torch.diag(p.mean(0)) - p.T @ p / len(p)           # mean_i diag(p_i) - p_i p_i^T
            a_factor = a_tr.T @ a_tr / len(a_tr)
            root = damping ** 0.5
            h = torch.kron(d_factor + root * torch.diagonal(d_factor).mean() * torch.eye(len(d_factor), dtype=torch.float64),
                           a_factor + root * torch.diagonal(a_factor).mean() * torch.eye(len(a_factor), dtype=torch.float64))
            weight = 1.0 if score_fn.endswith("_last") else float(ckpt["lr"])
            total = total + weight * g_te @ torch.linalg.solve(h, g_tr.T)
        else:  # trak: margin gradients g / (1 - p_y), kernel over the training set, the train side weighted by 1 - p_y
            q_tr = 1 - torch.softmax(logits_tr, 1)[torch.arange(len(y_tr)), y_tr]
            q_te = 1 - torch.softmax(logits_te, 1)[torch.arange(len(y_te)), y_te]
            phi_tr, phi_te = g_tr / q_tr[:, None], g_te / q_te[:, None]
            kernel = phi_tr.T @ phi_tr
            kernel = kernel + damping * torch.diagonal(kernel).mean() * torch.eye(len(kernel), dtype=torch.float64)
            total = total + phi_te @ torch.linalg.solve(kernel, (phi_tr * q_tr[:, None]).T)
    return total


@pytest.mark.parametrize("score_fn,damping", [("influence", 0.1), ("influence_last", 10.0), ("trak", 0.01)])
def test_scores_match_the_dense_reference(prepared, ckpts, tmp_path, score_fn, damping):
    tracin_job(TracInConfig(data_dir=str(prepared), checkpoint_dir=str(ckpts[0].parent), output_dir=str(tmp_path / "out"), top_k=5,
                            batch_size=4, num_workers=0, train_block=7, test_block=4, score_fn=score_fn, damping=damping,
                            device="cpu"))
    want = reference(prepared, ckpts, score_fn, damping)
    values, indices = np.load(tmp_path / "out" / "top_k_influences_values.npy"), np.load(tmp_path / "out" / "top_k_influences_indices.npy")
    scale = float(want.abs().max())
    top_v, top_i = torch.topk(want, 5, dim=1)
    np.testing.assert_allclose(values, top_v.numpy(), rtol=1e-3, atol=1e-4 * scale)
    # the same training images, up to near-ties
    np.testing.assert_allclose(np.take_along_axis(want.numpy(), indices, 1), top_v.numpy(), rtol=1e-3, atol=1e-4 * scale)
    assert (indices == top_i.numpy()).mean() > 0.9


def test_the_damping_split_gives_the_damping_times_the_mean_curvature():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 5, generator=g, dtype=torch.float64)
    d = torch.randn(20, 3, generator=g, dtype=torch.float64)
    a_mom, d_mom = a.T @ a / 20, d.T @ d / 20
    inv_a, inv_d = KroneckerCurvature.damped_inverses(a_mom, d_mom, 4.0)
    mean = torch.diagonal(torch.kron(d_mom, a_mom)).mean()
    # (D + 2 mean(D)) (x) (A + 2 mean(A)) = D (x) A + cross terms + 4 mean(D) mean(A) I
    shift = torch.kron(torch.linalg.inv(inv_d), torch.linalg.inv(inv_a)) - torch.kron(d_mom, a_mom)
    cross = 2 * torch.diagonal(d_mom).mean() * torch.kron(torch.eye(3, dtype=torch.float64), a_mom) \
        + 2 * torch.diagonal(a_mom).mean() * torch.kron(d_mom, torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(shift - cross, 4.0 * mean * torch.eye(15, dtype=torch.float64))
    # a projected layer (P, 1): all of the damping on A, exactly damping x mean curvature
    inv_a, inv_d = KroneckerCurvature.damped_inverses(a_mom, torch.ones(1, 1, dtype=torch.float64), 4.0)
    torch.testing.assert_close(torch.linalg.inv(inv_a), a_mom + 4.0 * torch.diagonal(a_mom).mean() * torch.eye(5, dtype=torch.float64))


def test_bad_score_settings_are_one_line_errors(prepared, ckpts, tmp_path):
    base = ["--data_dir", str(prepared), "--checkpoint_dir", str(ckpts[0].parent), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(UserError, match="--normalize train is for --score_fn tracin"):
        et.parse_args(base + ["--score_fn", "influence", "--normalize", "train"])
    with pytest.raises(SystemExit):
        et.parse_args(base + ["--damping", "-1"])
    with pytest.raises(UserError, match="needs the whole training set's curvature"):  # a shard holds part of it
        et.parse_args(base + ["--num_shards", "2"])
    assert et.parse_args(base).normalize == "none" and et.parse_args(base + ["--score_fn", "tracin"]).normalize == "train"
    assert et.parse_args(base).score_fn == "influence_last"


class Rows:
    """A factor view over in-memory factors of one checkpoint: {layer: (A, D)}."""

    def __init__(self, factors):
        self.factors = factors

    def load(self, t, layer, rows, device):
        return tuple(x[rows] for x in self.factors[layer])


def test_influence_with_a_projected_conv_layer_equals_the_dense_projected_reference():
    """--layers with a conv projected to R x R and fc: K-FAC whitening of the test factors equals the dense solve of the
    block-diagonal curvature (the full second moment of the projected conv gradient, the Kronecker GN of fc), built from
    torch.func per-example gradients projected with the hook's own matrices."""
    model = tiny_resnets(1)[0]
    (x_tr, y_tr), (x_te, y_te) = tiny_resnet_batch(12, 1), tiny_resnet_batch(3, 2)
    layers, damping = ["layer1.3", "fc"], 0.5
    with InfluenceHook(model, layers, proj_dim=3) as hook:
        te, _, _ = hook.factors(x_te, y_te)
        tr, logits_tr, _ = hook.factors(x_tr, y_tr)
        r_out, r_in = hook.proj["layer1.3"]
    curvature = KroneckerCurvature(Rows(tr), 12, layers, 1, gauss_newton={"fc": logits_tr[None].numpy()})
    whitened = curvature.whiten(Rows(te), damping)
    got = ghost_influence_block([{l: whitened.load(0, l, slice(None), None) for l in layers}], [tr], [1.0])

    def projected_conv_and_fc(x, y):
        g = per_example_grads(model, ["layer1.3.weight", "layer1.3.bias", "fc.weight", "fc.bias"], x, y)
        conv = torch.cat([g[:, :225].reshape(-1, 5, 45), g[:, 225:230, None]], 2)        # [W | b] (n, 5, 46)
        fc = torch.cat([g[:, 230:245].reshape(-1, 3, 5), g[:, 245:, None]], 2).flatten(1)  # [W | b] (n, 18)
        return (r_out @ conv @ r_in.T).flatten(1), fc

    p_tr, f_tr = projected_conv_and_fc(x_tr, y_tr)
    p_te, f_te = projected_conv_and_fc(x_te, y_te)
    a_conv = p_tr.T @ p_tr / 12
    h_conv = a_conv + damping * torch.diagonal(a_conv).mean() * torch.eye(9, dtype=torch.float64)
    seen = {}
    handle = model.fc.register_forward_hook(lambda m, i, o: seen.update(a=i[0]))
    with torch.no_grad():
        p = torch.softmax(model(x_tr), 1)
    handle.remove()
    a = torch.cat([seen["a"], torch.ones(12, 1, dtype=torch.float64)], 1)
    a_fc, d_fc = a.T @ a / 12, torch.diag(p.mean(0)) - p.T @ p / 12
    root = damping ** 0.5
    h_fc = torch.kron(d_fc + root * torch.diagonal(d_fc).mean() * torch.eye(3, dtype=torch.float64),
                      a_fc + root * torch.diagonal(a_fc).mean() * torch.eye(6, dtype=torch.float64))
    want = p_te @ torch.linalg.solve(h_conv, p_tr.T) + f_te @ torch.linalg.solve(h_fc, f_tr.T)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
