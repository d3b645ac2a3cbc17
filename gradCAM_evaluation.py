"""Grad-CAM maps (Selvaraju et al. 2017) on layer4 for mispredicted images and for a test image's proponents.

At small image sizes where layer4 is 1x1 (32 px), the deepest block with at least a 4x4 map
is used instead, and the figure title says which.

    $ python gradCAM_evaluation.py                              # best model, false_predictions.csv, TracIn results
    $ python gradCAM_evaluation.py --test_idx 100 --num_proponents 6

Writes false_predictions/gradcam_mispredictions.png (map of the predicted class over each
mispredicted test image; each also alone as false_predictions/gradcam/test_{idx}.png for the report) and
TracIn/results/gradcam/gradcam_test_{idx}_proponents.png (the test image beside its top proponents, each with the map of
its own given class; a tool folder of the run, TracIn/core/run_folder.py, with the TracIn run and model it came from).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib.checkpoints import check_same_model, find_best_model, load_checkpoint, model_from_checkpoint, model_record
from lib.cli import UserError, cli, nonneg_int, positive_int
from lib.data_utils import build_transform, list_split, load_rgb, read_false_predictions
from lib.devices import resolve_device
from lib.files import file_sha256, save_figure, save_json
from lib.outputs import GradcamMaps, load_gradcam as load  # noqa: F401  (this tool's reader)
from lib.ownership import Owner
from TracIn.core.results import RECORD, load_results, run_id
from TracIn.core.run_folder import tool_folder

log = logging.getLogger(__name__)
TOOL = "gradCAM_evaluation"
OWNER = Owner(TOOL)


class GradCAM:
    """Grad-CAM on one layer. A context manager that owns its hook handles.

        with GradCAM(model, model.layer4) as cam:
            maps = cam(x)            # (n, H, W) in [0, 1], for the predicted classes
            maps = cam(x, targets)   # for given classes
    """

    def __init__(self, model: torch.nn.Module, layer: torch.nn.Module):
        self.model, self.layer = model, layer
        self._handles = []
        self._act = None
        self._grad = None

    def __enter__(self):
        self._handles.append(self.layer.register_forward_hook(self._forward_hook))
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._act = self._grad = None

    def _forward_hook(self, module, inputs, output):
        self._act = output.detach()

        def save(g):
            self._grad = g.detach()

        if output.requires_grad:
            output.register_hook(save)

    def __call__(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        self.model.eval()
        self._act = self._grad = None
        x = x.detach().requires_grad_(True)  # a graph even when the model's parameters are frozen
        with torch.enable_grad():
            logits = self.model(x)
            if targets is None:
                targets = logits.argmax(1)
            score = logits.gather(1, targets.view(-1, 1).to(logits.device)).sum()
            torch.autograd.grad(score, x)  # fires the tensor hook; leaves parameters' .grad alone
        weights = self._grad.mean(dim=(2, 3), keepdim=True)  # (n, C, 1, 1): pooled gradients
        cam = torch.relu((weights * self._act).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
        peak = cam.flatten(1).max(1).values.view(-1, 1, 1)
        cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
        self._act = self._grad = None
        return cam.clamp_(0, 1)


def overlay(ax, path: str, cam: np.ndarray, title: str):
    img = np.asarray(load_rgb(path).resize(cam.shape[::-1]))
    ax.imshow(img)
    ax.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def save_overlay(path: Path, image_path: str, cam: np.ndarray, size: int = 128) -> None:
    """One image with its map blended in (jet, 45%), as a small PNG for the results browser."""
    import matplotlib
    from PIL import Image

    from lib.files import atomic_path

    img = load_rgb(image_path).convert("RGB").resize((size, size))
    heat = Image.fromarray((matplotlib.colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255).astype(np.uint8)).resize((size, size))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.blend(img, heat, 0.45).save(tmp, format="PNG")


def pick_layer(model, name: str, image_size: int, device, min_side: int = 4) -> str:
    """`name`, unless its output is smaller than min_side x min_side at this image size (layer4 of
    a ResNet is 1x1 at 32 px, where Grad-CAM is a constant): then the deepest block that is not."""
    shapes, handles = {}, []
    blocks = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
    for n in blocks:
        handles.append(getattr(model, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape[-2:])))
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    for h in handles:
        h.remove()
    if name not in shapes:
        raise UserError(f"--layer {name}: the model has no such block (choose from {', '.join(blocks)})")
    if min(shapes[name]) >= min_side:
        return name
    usable = [n for n in blocks if min(shapes[n]) >= min_side]
    chosen = usable[-1] if usable else blocks[0]
    log.info(f"Grad-CAM: {name} is {tuple(shapes[name])} at {image_size} px, too coarse for a map; using {chosen} "
             f"{tuple(shapes[chosen])} instead")
    return chosen


def cams_for(model, layer, paths, targets, tf, device) -> np.ndarray:
    x = torch.stack([tf(load_rgb(p)) for p in paths]).to(device)
    with GradCAM(model, layer) as cam:
        return cam(x, torch.as_tensor(targets, device=device)).cpu().numpy()


IDENTITY_KEYS = ("data_dir", "manifest_key", "train_key", "test_key")  # of the data, as in the false predictions' record


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the best model in --models_dir)")
    p.add_argument("--models_dir", default="models", help="where the best model is (default models)")
    p.add_argument("--data_dir", default="data/processed", help="prepared data (default data/processed)")
    p.add_argument("--false_predictions", default="false_predictions/false_predictions.csv", help="from false_prediction.py")
    p.add_argument("--results_dir", default="TracIn/results", help="TracIn results (default TracIn/results)")
    p.add_argument("--out_dir", default="false_predictions", help="for the mispredictions grid (default false_predictions)")
    p.add_argument("--max_images", type=positive_int, default=16, help="mispredicted test images shown (default 16)")
    p.add_argument("--test_idx", type=nonneg_int, default=None, help="test image for the proponent panel (default: the first mispredicted one)")
    p.add_argument("--num_proponents", type=positive_int, default=5, help="proponents shown (default 5)")
    p.add_argument("--layer", default="layer4", help="ResNet block for the maps (default layer4; a deeper-than-useful "
                   "block at small image sizes falls back to the deepest one at least 4x4)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    return p.parse_args(argv)


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = parse_args(argv)
    device = resolve_device(args.device)
    model_path = args.model or find_best_model(args.models_dir)
    test_list, train_list = list_split(args.data_dir, "test"), list_split(args.data_dir, "train")
    ckpt = load_checkpoint(model_path, class_names=test_list.class_names)
    model = model_from_checkpoint(ckpt).to(device)
    layer_name = pick_layer(model, args.layer, ckpt["image_size"], device)
    layer = getattr(model, layer_name)
    tf = build_transform(ckpt["image_size"], train=False, mean=ckpt["mean"], std=ckpt["std"])
    names = test_list.class_names
    model_sha = file_sha256(model_path)
    wrong, fp_record = read_false_predictions(args.false_predictions, args.data_dir, model_sha)
    wrong = wrong[wrong.split == "test"].head(args.max_images)
    bad = wrong[~wrong.pred_label.isin(names) | (wrong["index"] < 0) | (wrong["index"] >= len(test_list.paths))]
    if len(bad):
        raise UserError(f"{args.false_predictions}: row of test image {bad['index'].iloc[0]} names no image or class of "
                        f"{args.data_dir}; rerun false_prediction.py")
    outputs = []
    gradcam_dir = Path(args.out_dir) / "gradcam"
    gradcam = OWNER.folder(gradcam_dir, "--out_dir")  # refused before any work
    if len(wrong):
        cams = cams_for(model, layer, list(wrong.path), [names.index(c) for c in wrong.pred_label], tf, device)
        cols = min(8, len(wrong))
        rows = -(-len(wrong) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.7, rows * 2.0 + 0.4), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, (_, r), c in zip(axes.ravel(), wrong.iterrows(), cams):
            overlay(ax, r.path, c, f"#{r['index']} {r.true_label} -> {r.pred_label}")
        # the per-image maps as one folder, swapped in whole, with what they were computed from
        with gradcam as build:
            for (_, r), c in zip(wrong.iterrows(), cams):
                save_overlay(build / f"test_{r['index']}.png", r.path, c)
            save_json(build / "identity.json", {"model": str(model_path), "model_sha256": model_sha,
                                                **{k: fp_record.get(k) for k in IDENTITY_KEYS}})
        fig.suptitle(f"Grad-CAM ({layer_name}) of the predicted class on mispredicted test images, model of epoch "
                     f"{ckpt['epoch']} ({Path(model_path).name})", fontsize=9)
        fig.tight_layout()
        outputs.append(Path(args.out_dir) / "gradcam_mispredictions.png")
        save_figure(outputs[-1], fig)
        OWNER.claim(args.out_dir, [outputs[-1].name])

    else:  # no mispredicted test image: an empty maps folder, so no earlier model's maps stay behind
        with gradcam as build:
            save_json(build / "identity.json", {"model": str(model_path), "model_sha256": model_sha,
                                                **{k: fp_record.get(k) for k in IDENTITY_KEYS}})

    res = Path(args.results_dir)
    if (res / RECORD).exists():
        OWNER.folder(res / "gradcam", "--results_dir")  # refused before any work
        r = load_results(res, data_dir=args.data_dir)
        check_same_model(r.record.get("model"), model_record(model_path, ckpt), f"the TracIn run in {res} and --model {model_path}",
                         "run efficient_tracin.py and gradCAM_evaluation.py on the selected model (their defaults)")
        idx, vals = r["top_k_influences_indices"], r["top_k_influences_values"]
        t = args.test_idx if args.test_idx is not None else (int(wrong["index"].iloc[0]) if len(wrong) else int(r["test_indices"][0]))
        row = r.test_row(t)
        k = min(args.num_proponents, idx.shape[1])
        paths = [test_list.paths[t]] + [train_list.paths[j] for j in idx[row, :k]]
        targets = [int(test_list.labels[t])] + [int(train_list.labels[j]) for j in idx[row, :k]]
        cams = cams_for(model, layer, paths, targets, tf, device)
        fig, axes = plt.subplots(1, k + 1, figsize=((k + 1) * 1.9, 2.4), squeeze=False)
        overlay(axes[0, 0], paths[0], cams[0], f"test #{t}\n{names[targets[0]]}")
        for j in range(k):
            overlay(axes[0, j + 1], paths[j + 1], cams[j + 1], f"proponent {j + 1}: #{idx[row, j]}\n{names[targets[j + 1]]} ({vals[row, j]:.3g})")
        fig.suptitle(f"Grad-CAM ({layer_name}) of each image's own label, model of epoch {ckpt['epoch']}", fontsize=9)
        fig.tight_layout()
        with tool_folder(res / "gradcam", TOOL, {"tracin_run": run_id(r.record), "model": str(model_path),
                                                 "model_sha256": model_sha}, "--results_dir") as build:
            save_figure(build / f"gradcam_test_{t}_proponents.png", fig)
        outputs.append(res / "gradcam" / f"gradcam_test_{t}_proponents.png")
    log.info("Grad-CAM: " + (", ".join(map(str, outputs)) if outputs else "nothing to show (no mispredictions, no TracIn results)"))
    return 0


if __name__ == "__main__":
    cli(main)
