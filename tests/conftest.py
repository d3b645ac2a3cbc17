"""Shared fixtures: tiny models, a prepared tiny data set, a trained run, headless Chromium (helpers: helpers.py)."""
import os

import pytest
import torch

from helpers import make_raw_tree, make_tiny_models

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_models():
    return make_tiny_models()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """A prepared tiny data set (32 px, 25% test, 1 noisy label; no val split: too few images to hold one out)."""
    from prepare_data import main

    base = tmp_path_factory.mktemp("data")
    make_raw_tree(base / "raw")
    rc = main(["--raw_dir", str(base / "raw"), "--out_dir", str(base / "processed"), "--image_size", "32",
               "--test_fraction", "0.25", "--label_noise", "0.1", "--num_workers", "0", "--val_fraction", "0"])
    assert rc == 0
    return base / "processed"


@pytest.fixture(scope="session")
def trained(prepared, tmp_path_factory):
    """Two epochs of resnet18 on the tiny data, and TracIn over its checkpoints."""
    root = tmp_path_factory.mktemp("trained")
    import train
    from TracIn.core.arguments import TracInConfig
    from TracIn.core.job import tracin_job

    assert train.main(["--data_dir", str(prepared), "--arch", "resnet18", "--epochs", "2", "--batch_size", "4",
                       "--weights", "none", "--save_checkpoints_every", "1", "--checkpoint_dir", str(root / "ckpt"),
                       "--models_dir", str(root / "models"), "--num_workers", "0", "--no-hflip"]) == 0
    tracin_job(TracInConfig(data_dir=str(prepared), checkpoint_dir=str(root / "ckpt"), output_dir=str(root / "res"), top_k=3,
                            num_workers=0, score_fn="tracin", normalize="none", all_checkpoints=True))
    return root


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
