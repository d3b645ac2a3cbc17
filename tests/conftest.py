"""Shared fixtures: tiny models and a tiny generated image tree."""
import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


class TinyConvNet(nn.Module):
    """conv -> BN -> ReLU -> pool -> fc1 -> ReLU -> fc: small, with awkward sizes."""

    def __init__(self, num_classes=3, hidden=7):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(16, hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1)
        return self.fc(torch.relu(self.fc1(h)))


def make_tiny_models(n_ckpt=3, dtype=torch.float64, seed=0, num_classes=3):
    """n_ckpt 'checkpoints': the same net with different random weights and BN stats."""
    models = []
    for t in range(n_ckpt):
        torch.manual_seed(seed + t)
        m = TinyConvNet(num_classes).to(dtype)
        with torch.no_grad():
            m.bn.running_mean.uniform_(-0.5, 0.5)
            m.bn.running_var.uniform_(0.5, 2.0)
        models.append(m.eval())
    return models


@pytest.fixture
def tiny_models():
    return make_tiny_models()


# ---------------------------------------------------------------- a tiny real image tree
def _write_image(path, kind, rgb, rng):
    import io

    import numpy as np
    from PIL import Image

    w, h = 24, 20
    arr = np.clip(np.array(rgb)[None, None, :] + rng.integers(-30, 30, (h, w, 3)), 0, 255).astype("uint8")
    img = Image.fromarray(arr, "RGB")
    if kind == "jpg":
        img.save(path, "JPEG")
    elif kind == "gray_png":
        img.convert("L").save(path)
    elif kind == "palette_png":
        p = img.convert("P", palette=Image.ADAPTIVE)
        p.info["transparency"] = 0
        p.save(path, transparency=0)
    elif kind == "rgba_png":
        img.putalpha(200)
        img.save(path)
    elif kind == "cmyk_jpg":
        img.convert("CMYK").save(path, "JPEG")
    elif kind == "16bit_png":
        Image.fromarray(np.asarray(img.convert("L")).astype("uint16") * 257).save(path)
    elif kind == "exif_jpg":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90
        img.save(path, "JPEG", exif=exif.tobytes())
    else:
        raise ValueError(kind)


def make_raw_tree(root, per_class=8, seed=0):
    """Italian class folders, JPEG and PNG in odd colour modes, plus bad files."""
    import numpy as np

    rng = np.random.default_rng(seed)
    classes = {"cane": (200, 40, 40), "gatto": (40, 200, 40), "ragno": (40, 40, 200)}
    kinds = ["jpg", "gray_png", "palette_png", "rgba_png", "cmyk_jpg", "16bit_png", "exif_jpg", "jpg"]
    for name, rgb in classes.items():
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            kind = kinds[i % len(kinds)]
            ext = "png" if kind.endswith("png") else "jpg"
            _write_image(d / f"img_{i:02d}.{ext}", kind, rgb, rng)
    good = (root / "cane" / "img_00.jpg").read_bytes()
    (root / "cane" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "gatto" / "empty.jpg").write_bytes(b"")
    (root / "ragno" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared tiny data set (32 px, 25% test, 1 noisy label)."""
    from prepare_data import main

    base = tmp_path_factory.mktemp("data")
    make_raw_tree(base / "raw")
    rc = main(["--raw_dir", str(base / "raw"), "--out_dir", str(base / "processed"), "--image_size", "32",
               "--test_fraction", "0.25", "--label_noise", "0.1", "--num_workers", "0"])
    assert rc == 0
    return base / "processed"


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory):
    """Two epochs of resnet18 on the tiny data, and TracIn over its checkpoints."""
    root = tmp_path_factory.mktemp("trained")
    import train
    from TracIn import efficient_tracin as et

    assert train.main(["--data_dir", str(prepared), "--arch", "resnet18", "--epochs", "2", "--batch_size", "4",
                       "--weights", "none", "--save_checkpoints_every", "1", "--checkpoint_dir", str(root / "ckpt"),
                       "--models_dir", str(root / "models"), "--num_workers", "0", "--no-hflip"]) == 0
    assert et.main(["--data_dir", str(prepared), "--checkpoint_dir", str(root / "ckpt"), "--output_dir", str(root / "res"),
                    "--top_k", "3", "--num_workers", "0", "--normalize", "none"]) == 0
    return root


def make_random_checkpoints(ckpt_dir, class_names, n=3, arch="resnet18", image_size=32, lrs=(0.01, 0.004, 0.002), seed=100):
    """Checkpoints of differently initialised models (TracIn needs no training to be exact)."""
    from data_utils import IMAGENET_MEAN, IMAGENET_STD
    from model_architecture import build_model, make_checkpoint, save_checkpoint

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for t in range(n):
        torch.manual_seed(seed + t)
        m = build_model(arch, len(class_names)).eval()
        save_checkpoint(make_checkpoint(m, arch=arch, class_names=class_names, image_size=image_size, mean=IMAGENET_MEAN,
                                        std=IMAGENET_STD, epoch=t + 1, lr=lrs[t], metrics={}),
                        ckpt_dir / f"finetune_epoch_{t + 1}.pth")
    return sorted(ckpt_dir.glob("finetune_epoch_*.pth"))


def write_false_predictions(csv_path, frame, data_dir, model_sha256="0" * 64):
    """A hand-made mispredictions table with the record false_prediction.py writes beside it (model and data)."""
    import json
    from pathlib import Path

    from data_utils import data_identity

    csv_path = Path(csv_path)
    frame.to_csv(csv_path, index=False)
    csv_path.with_suffix(".json").write_text(json.dumps({"model": "hand-made", "model_sha256": model_sha256,
                                                         **data_identity(data_dir)}))
    return csv_path


# ---------------------------------------------------------------- headless Chromium for the report's browser tests
@pytest.fixture(scope="module")
def browser():
    """Debian's chromium + chromium-driver driven by selenium; skipped with its reason where they are not installed."""
    import shutil

    chromium, chromedriver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("no Chromium: install Debian's chromium and chromium-driver (.ci/run does, as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(a)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    yield driver
    driver.quit()
