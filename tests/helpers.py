"""Helpers shared by the test modules (fixtures stay in conftest.py): tiny models, a tiny real image tree,
random checkpoints, a hand-made mispredictions table, running a script as a user does, and a browser poll."""
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- a tiny real image tree
def _write_image(path, kind, rgb, rng):

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


def make_random_checkpoints(ckpt_dir, class_names, n=3, arch="resnet18", image_size=32, lrs=(0.01, 0.004, 0.002), seed=100):
    """Checkpoints of differently initialised models (TracIn needs no training to be exact)."""
    from lib.data_utils import IMAGENET_MEAN, IMAGENET_STD
    from lib.checkpoints import make_checkpoint, save_checkpoint
    from model_architecture import build_model

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for t in range(n):
        torch.manual_seed(seed + t)
        m = build_model(arch, len(class_names)).eval()
        save_checkpoint(make_checkpoint(m, arch=arch, class_names=class_names, image_size=image_size, mean=IMAGENET_MEAN,
                                        std=IMAGENET_STD, epoch=t + 1, lr=lrs[t], metrics={}),
                        ckpt_dir / f"finetune_epoch_{t + 1}.pth")
    return sorted(ckpt_dir.glob("finetune_epoch_*.pth"))


def write_false_predictions(csv_path, frame, data_dir, model_sha256="0" * 64, results_dir=None):
    """A hand-made mispredictions table with the record false_prediction.py writes beside it (model and data); with
    results_dir, of the model that TracIn run explains."""
    import json
    from pathlib import Path

    from lib.data_utils import data_identity

    csv_path = Path(csv_path)
    frame.to_csv(csv_path, index=False)
    from lib.files import file_sha256

    model = json.loads((Path(results_dir) / "run.json").read_text())["model"] if results_dir else {"path": "hand-made"}
    csv_path.with_suffix(".json").write_text(json.dumps({"model": model, "model_sha256": model_sha256,
                                                         **data_identity(data_dir), "csv_sha256": file_sha256(csv_path)}))
    return csv_path


def sh(*argv, env=None, cwd=REPO):
    """Run a script as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=full_env)


def one_error_line(out, *needles):
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, out.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def checksums(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for(driver, script, timeout=10.0):
    """Poll a JavaScript expression until it is truthy; return its value."""
    end = time.time() + timeout
    while time.time() < end:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {script}")


# ---------------------------------------------------------------- a tiny ResNet-like net with convolutions
class TinyResNet(nn.Module):
    """stem conv -> BN -> a block of two convs (stride 2; the second with a bias) -> pool -> fc."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                                    nn.Conv2d(5, 5, 3, padding=1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(torch.relu(self.layer1(h))).flatten(1))


def tiny_resnets(n_ckpt=2):
    models = []
    for t in range(n_ckpt):
        torch.manual_seed(10 + t)
        m = TinyResNet().double()
        with torch.no_grad():
            for bn in (m.bn1, m.layer1[1]):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
        models.append(m.eval())
    return models


def tiny_resnet_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------- a factor cache damaged on disk
def damage_npy(path, how):
    """Damage a float32 .npy of the factor cache in place: "truncate" cuts off its last quarter (as a full disk or a
    killed copy leaves it); "flip" changes the exponent byte of its first value, keeping the size."""
    import numpy as np

    path = Path(path)
    size = path.stat().st_size
    if how == "truncate":
        os.truncate(path, size - size // 4)
        return
    n_bytes = int(np.prod(np.load(path, mmap_mode="r").shape)) * 4
    with open(path, "r+b") as f:
        f.seek(size - n_bytes + 3)  # the first value's most significant byte (little-endian float32)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x40]))
