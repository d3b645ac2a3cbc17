"""Multi-layer TracIn: convolutions through Kronecker-projected gradients, against torch.func per-example
gradients in float64 on a tiny ResNet-like net; the pipeline end to end with --layers layer4 fc."""
import json

import numpy as np
import pytest
import torch

from lib.cli import UserError
from lib.data_utils import list_split
from helpers import TinyResNet, make_random_checkpoints, tiny_resnet_batch as batch, tiny_resnets as tiny
from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job
from reference import reference_influence
from TracIn.core.ghost import InfluenceHook, ghost_influence_block, target_layers


PARAMS = ["layer1.0.weight", "layer1.3.weight", "layer1.3.bias", "fc.weight", "fc.bias"]


def scores(models, lrs, layers, **proj):
    (x_tr, y_tr), (x_te, y_te) = batch(5, 1), batch(3, 2)
    te, tr = [], []
    for m in models:
        with InfluenceHook(m, layers, **proj) as hook:
            te.append(hook.factors(x_te, y_te)[0])
            tr.append(hook.factors(x_tr, y_tr)[0])
    return ghost_influence_block(te, tr, lrs)


def exact(models, lrs):
    (x_tr, y_tr), (x_te, y_te) = batch(5, 1), batch(3, 2)
    return reference_influence(models, lrs, PARAMS, x_tr, y_tr, x_te, y_te)


def test_blocks_expand_to_their_layers_and_bad_names_are_named():
    m = TinyResNet()
    assert target_layers(m, ["layer1", "fc"]) == ["layer1.0", "layer1.3", "fc"]
    assert target_layers(m, ["fc", "layer1.3", "layer1"]) == ["layer1.0", "layer1.3", "fc"]  # model order, no duplicates
    with pytest.raises(ValueError, match="no layer named 'layer9'"):
        target_layers(m, ["layer9"])
    with pytest.raises(ValueError, match="BatchNorm2d, not a supported type"):
        target_layers(m, ["bn1"])
    with pytest.raises(ValueError, match="larger than layer layer1.0's width"):
        InfluenceHook(m, ["layer1.0"], proj_dim=37)  # widths: 5 outputs, 36 inputs per position


def test_identity_projections_give_exact_multilayer_tracin():
    models, lrs = tiny(), [0.3, 0.1]
    ref = exact(models, lrs)
    layers = ["layer1.0", "layer1.3", "fc"]
    for proj in ({"proj_dim": 0}, {"proj_dim": 0, "project_linear": True}):
        torch.testing.assert_close(scores(models, lrs, layers, **proj), ref, rtol=1e-10, atol=1e-12)
    # R as wide as a layer is that layer's identity too
    single = reference_influence(models, lrs, ["layer1.0.weight"], *batch(5, 1), *batch(3, 2))
    torch.testing.assert_close(scores(models, lrs, ["layer1.0"], proj_dim=36), single, rtol=1e-10, atol=1e-12)


def test_autograd_starts_at_the_first_target_layer():
    (m,) = tiny(1)
    calls = []
    m.conv1.register_full_backward_hook(lambda *a: calls.append("conv1"))
    m.layer1[0].register_full_backward_hook(lambda *a: calls.append("layer1.0"))
    with InfluenceHook(m, ["layer1.3", "fc"], proj_dim=2) as hook:
        hook.factors(*batch(4, 3))
    assert calls == []  # layer1.3 is the first target: nothing before it is back-propagated


def test_random_projections_are_unbiased_and_sharpen_with_r():
    models, lrs = tiny(1), [1.0]
    layers = ["layer1.0", "layer1.3"]
    ref = reference_influence(models, lrs, PARAMS[:3], *batch(5, 1), *batch(3, 2))
    errors = {}
    for r in (1, 2, 4):
        est = torch.stack([scores(models, lrs, layers, proj_dim=r, proj_seed=s) for s in range(300)])
        mean, se = est.mean(0), est.std(0) / np.sqrt(len(est))
        z = ((mean - ref).abs() / se).max().item()
        assert z < 3.0, f"R={r}: mean over projection seeds is {z:.2f} standard errors from the exact scores"
        errors[r] = ((est - ref) ** 2).mean().sqrt().item() / ref.abs().mean().item()
    assert errors[1] > errors[2] > errors[4]
    assert errors[1] / errors[4] > 1.5  # the variance falls roughly like 1/R per side


@pytest.fixture(scope="module")
def data(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    make_random_checkpoints(root / "ckpt", list_split(prepared, "train").class_names, n=2, lrs=(0.01, 0.004))
    return prepared, root


def run(data, out, **settings):
    """A TracIn job through the library, as efficient_tracin runs it."""
    d, root = data
    return tracin_job(TracInConfig(**{"data_dir": str(d), "checkpoint_dir": str(root / "ckpt"), "output_dir": str(out), "top_k": 4,
                                      "num_workers": 0, "layers": ["layer4", "fc"], "proj_dim": 4, "score_fn": "tracin",
                                      "normalize": "none", **settings}))


def test_pipeline_with_conv_layers_matches_the_hook_and_caches_by_projection(data, tmp_path):
    d, root = data
    first = run(data, tmp_path / "o")
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["layers"] == ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2", "fc"]
    assert rec["identity"]["factors"]["proj_dim"] == 4 and first["layer_dims"]["layer4.0.conv1"] == [16, 1]
    # the same scores from the hook directly, with the same (seeded) projections for train and test
    from lib.checkpoints import load_checkpoint, model_from_checkpoint
    from lib.data_utils import ImageListDataset, eval_transform

    ckpts = [load_checkpoint(p) for p in sorted((root / "ckpt").glob("*.pth"))]
    tr, te = list_split(d, "train"), list_split(d, "test")
    tf = eval_transform(ckpts[0])
    xs = {s: torch.stack([ImageListDataset(l, tf)[i][0] for i in range(len(l.paths))]) for s, l in (("tr", tr), ("te", te))}
    run_factors = {"tr": [], "te": []}
    for c in ckpts:
        with InfluenceHook(model_from_checkpoint(c), rec["layers"], proj_dim=4) as hook:
            for s, l in (("tr", tr), ("te", te)):
                run_factors[s].append(hook.factors(xs[s], torch.as_tensor(l.labels))[0])
    full = ghost_influence_block(run_factors["te"], run_factors["tr"], [c["lr"] for c in ckpts]).numpy()
    expected = -np.sort(-full, axis=1)[:, :4]
    np.testing.assert_allclose(np.load(tmp_path / "o" / "top_k_influences_values.npy"), expected, rtol=2e-4, atol=1e-6)
    # re-scoring reuses the cache; another projection seed is another cache
    assert run(data, tmp_path / "o", top_k=3)["batches_computed"] == {"train": 0, "test": 0}
    assert run(data, tmp_path / "o", proj_seed=1)["batches_computed"]["train"] > 0
    with pytest.raises(UserError, match="larger than layer layer4.0.conv1's width"):
        run(data, tmp_path / "o", proj_dim=100000)
