"""Fetch torchvision's ImageNet ResNet weights into models/pretrained/ (the only network access).

    $ python download_weights.py                       # resnet50, IMAGENET1K_V2
    $ python download_weights.py --from_file ~/resnet50-11ad3fa6.pth   # offline: install a local copy

train.py --weights imagenet then finds the file. Offline, the download fails with one line
saying how to place the file by hand. torchvision names its weight files
<arch>-<first 8 hex digits of the sha256>.pth, so every file is checked against that hash
and by loading it into the architecture before it is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from lib.cli import UserError, cli
from lib.files import atomic_path
from lib.models import ARCHS, PRETRAINED_DIR, PRETRAINED_FILES, build_model

BASE_URL = "https://download.pytorch.org/models/"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="resnet50", help="architecture (default resnet50)")
    p.add_argument("--out_dir", default=str(PRETRAINED_DIR), help=f"destination folder (default {PRETRAINED_DIR})")
    p.add_argument("--from_file", default=None, help="install this local weights file instead of downloading")
    p.add_argument("--timeout", type=float, default=20.0, help="network timeout in seconds (default 20)")
    return p.parse_args(argv)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, arch: str) -> None:
    expected = PRETRAINED_FILES[arch].rsplit("-", 1)[1].split(".")[0]
    digest = sha256(path)
    if not digest.startswith(expected):
        raise UserError(f"{path} has sha256 {digest[:8]}..., but torchvision's {PRETRAINED_FILES[arch]} starts with {expected}")
    build_model(arch, num_classes=10, weights=str(path))  # raises a UserError if it does not fit


def download(url: str, tmp: Path, name: str, timeout: float) -> None:
    """Fetch url into tmp (a temporary path the caller renames into place once it is verified)."""
    from tqdm import tqdm

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise UserError(
            f"cannot download {url} ({getattr(e, 'reason', e)}); offline, copy that file by hand and run "
            f"python download_weights.py --from_file PATH (or train with --weights none)"
        ) from None


def main(argv=None):
    args = parse_args(argv)
    dest = Path(args.out_dir) / PRETRAINED_FILES[args.arch]
    if args.from_file:
        src = Path(args.from_file)
        if not src.is_file():
            raise UserError(f"--from_file {src}: no such file")
        verify(src, args.arch)
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    else:
        # verified before it is renamed into place: a bad download never replaces (or leaves behind) a weights file
        with atomic_path(dest) as tmp:
            download(BASE_URL + PRETRAINED_FILES[args.arch], tmp, dest.name, args.timeout)
            verify(tmp, args.arch)
    print(f"installed {args.arch} ImageNet weights at {dest}")
    return 0


if __name__ == "__main__":
    cli(main)
