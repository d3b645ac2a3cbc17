"""Nothing lost, one error line: overwrite rules, worker errors, bad paths and devices, a full disk,
SIGKILL then resume for train.py and efficient_tracin (each as a user runs them: a subprocess)."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import prepare_data
import train
from lib.checkpoints import load_checkpoint
from lib.cli import UserError
from lib.data_utils import list_split
from lib.devices import resolve_device
from helpers import checksums, make_random_checkpoints, make_raw_tree, one_error_line, sh
from TracIn import efficient_tracin

RESULT_ARRAYS = ["top_k_influences_values", "top_k_influences_indices", "top_k_opponents_values",
                 "top_k_opponents_indices", "self_influence", "test_indices", "test_pred"]


# ---------------------------------------------------------------- data loss
@pytest.mark.parametrize("layout", ["same", "parent", "inside", "unmarked"])
def test_prepare_overwrite_never_deletes_data_it_did_not_write(tmp_path, layout):
    raw = make_raw_tree(tmp_path / "data" / "raw-img", per_class=3)
    (tmp_path / "data" / "checkpoints").mkdir()
    (tmp_path / "data" / "checkpoints" / "finetune_epoch_1.pth").write_bytes(b"someone's checkpoint")
    out = {"same": raw, "parent": tmp_path / "data", "inside": raw / "processed", "unmarked": tmp_path / "data" / "checkpoints"}[layout]
    before = checksums(tmp_path)
    res = sh("prepare_data.py", "--raw_dir", raw, "--out_dir", out, "--image_size", "16", "--num_workers", "0", "--overwrite")
    one_error_line(res, str(out))
    assert checksums(tmp_path) == before


def test_prepare_replaces_its_own_folder_with_overwrite(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", per_class=3)
    out = tmp_path / "processed"
    assert sh("prepare_data.py", "--raw_dir", raw, "--out_dir", out, "--image_size", "16", "--num_workers", "0").returncode == 0
    res = sh("prepare_data.py", "--raw_dir", raw, "--out_dir", out, "--image_size", "16", "--num_workers", "0", "--seed", "3")
    one_error_line(res, "--overwrite")
    assert sh("prepare_data.py", "--raw_dir", raw, "--out_dir", out, "--image_size", "16", "--num_workers", "0", "--seed", "3",
              "--overwrite").returncode == 0
    assert (out / "manifest.csv").exists()


# ---------------------------------------------------------------- one error line
def test_prepare_with_worker_pool_prints_no_traceback(tmp_path):
    raw = make_raw_tree(tmp_path / "raw", per_class=40)
    for _ in range(2):  # the inherited SIGTERM handler used to print tracebacks on most runs
        shutil.rmtree(tmp_path / "p", ignore_errors=True)
        res = sh("prepare_data.py", "--raw_dir", raw, "--out_dir", tmp_path / "p", "--image_size", "16", "--num_workers", "2")
        assert res.returncode == 0 and "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr, res.stderr


@pytest.fixture(scope="module")
def corrupt_data(prepared, tmp_path_factory):
    """A copy of the prepared data with one training JPEG cut short, and checkpoints for it."""
    root = tmp_path_factory.mktemp("corrupt")
    data = root / "processed"
    shutil.copytree(prepared, data)
    victim = Path(list_split(data, "train").paths[7])
    victim.write_bytes(victim.read_bytes()[:200])
    ckpts = make_random_checkpoints(root / "ckpt", list_split(data, "train").class_names, n=2)
    return data, ckpts[0].parent, victim


def test_corrupt_image_is_one_line_in_tracin_before_any_forward_pass(corrupt_data, tmp_path):
    data, ckpt_dir, victim = corrupt_data
    res = sh("TracIn/efficient_tracin.py", "--data_dir", data, "--checkpoint_dir", ckpt_dir, "--output_dir", tmp_path / "o",
             "--top_k", "3", "--num_workers", "2")
    one_error_line(res, str(victim))
    assert not (tmp_path / "o" / "factors").exists() or not any((tmp_path / "o" / "factors").rglob("done.npy"))


def test_corrupt_image_in_a_dataloader_worker_is_one_line_in_train(corrupt_data, tmp_path):
    data, _, victim = corrupt_data
    res = sh("train.py", "--data_dir", data, "--arch", "resnet18", "--epochs", "1", "--batch_size", "4", "--weights", "none",
             "--checkpoint_dir", tmp_path / "c", "--models_dir", tmp_path / "m", "--num_workers", "2")
    one_error_line(res, str(victim))


def test_unknown_device_is_one_line(prepared, tmp_path):
    one_error_line(sh("train.py", "--data_dir", prepared, "--device", "tpu"), "--device 'tpu'")
    for main in (efficient_tracin.main, evaluate.main):  # the same UserError, in process (cheaper)
        with pytest.raises(UserError, match="--device 'tpu' is not supported"):
            main(["--data_dir", str(prepared), "--device", "tpu"])
    with pytest.raises(UserError, match="cuda:N"):
        resolve_device("cpu:1")


@pytest.mark.parametrize("case", ["file", "proc"])
def test_unwritable_output_dir_is_refused_before_any_work(prepared, tmp_path, case):
    target = {"file": tmp_path / "a_file", "proc": Path("/proc/tracin_results")}[case]
    (tmp_path / "a_file").write_text("x")
    ckpts = make_random_checkpoints(tmp_path / "ckpt", list_split(prepared, "train").class_names, n=1)
    with pytest.raises(UserError, match="--output_dir"):
        efficient_tracin.main(["--data_dir", str(prepared), "--checkpoint_dir", str(ckpts[0].parent), "--output_dir", str(target)])
    with pytest.raises(UserError, match="--checkpoint_dir"):
        train.main(["--data_dir", str(prepared), "--checkpoint_dir", str(target), "--epochs", "1"])
    with pytest.raises(UserError, match="--out_dir"):
        prepare_data.main(["--raw_dir", str(make_raw_tree(tmp_path / "raw", per_class=2)), "--out_dir", str(target)])


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only); skipped with its reason where it cannot be mounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.strip() or res.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_is_one_line_naming_the_folder(prepared, tmp_path, small_disk):
    ckpts = make_random_checkpoints(tmp_path / "ckpt", list_split(prepared, "train").class_names, n=3)
    (small_disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 64 * 1024))  # leave ~64 KiB
    res = sh("TracIn/efficient_tracin.py", "--data_dir", prepared, "--checkpoint_dir", ckpts[0].parent,
             "--output_dir", small_disk / "res", "--top_k", "2", "--num_workers", "0", "--batch_size", "4")
    one_error_line(res, str(small_disk), "MiB")
    (small_disk / "filler").unlink()
    (small_disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 512 * 1024))
    res = sh("train.py", "--data_dir", prepared, "--arch", "resnet18", "--epochs", "1", "--batch_size", "4", "--weights", "none",
             "--checkpoint_dir", small_disk / "ckpt", "--models_dir", tmp_path / "models", "--num_workers", "0")
    one_error_line(res, "no space left", str(small_disk))
    assert not [p for p in (small_disk / "ckpt").iterdir() if p.suffix == ".pth" or p.name.endswith(".tmp.pth")]


# ---------------------------------------------------------------- SIGKILL, then resume
def test_train_resume_after_sigkill_gives_identical_weights(prepared, tmp_path):
    base = ["--data_dir", str(prepared), "--arch", "resnet18", "--epochs", "2", "--batch_size", "4", "--weights", "none",
            "--save_checkpoints_every", "1", "--learning_rate", "1e-3", "--num_workers", "0", "--seed", "5"]
    assert train.main(base + ["--checkpoint_dir", str(tmp_path / "a"), "--models_dir", str(tmp_path / "ma")]) == 0
    # 18 images, batch 4, ragged batch dropped: 4 steps an epoch; die in the middle of epoch 2
    killed = sh("tests/kill_after.py", "train", "6", *base, "--checkpoint_dir", tmp_path / "b", "--models_dir", tmp_path / "mb")
    assert killed.returncode == -9
    assert (tmp_path / "b" / "finetune_epoch_1.pth").exists() and not (tmp_path / "b" / "finetune_epoch_2.pth").exists()
    assert train.main(base + ["--checkpoint_dir", str(tmp_path / "b"), "--models_dir", str(tmp_path / "mb"), "--resume"]) == 0
    for name in ("finetune_epoch_1.pth", "finetune_epoch_2.pth"):
        a, b = load_checkpoint(tmp_path / "a" / name), load_checkpoint(tmp_path / "b" / name)
        for k in a["model_state"]:
            assert torch.equal(a["model_state"][k], b["model_state"][k]), (name, k)
        assert a["metrics"] == b["metrics"]
    da, db = np.load(tmp_path / "a" / "training_dynamics.npz"), np.load(tmp_path / "b" / "training_dynamics.npz")
    for k in ("loss", "margin", "correct"):  # the per-image training dynamics survive the kill too
        np.testing.assert_array_equal(da[k], db[k], err_msg=k)


def test_tracin_rerun_after_sigkill_gives_identical_arrays(prepared, tmp_path):
    ckpts = make_random_checkpoints(tmp_path / "ckpt", list_split(prepared, "train").class_names, n=2)
    base = ["--data_dir", str(prepared), "--checkpoint_dir", str(ckpts[0].parent), "--top_k", "4", "--batch_size", "4",
            "--num_workers", "0"]
    assert efficient_tracin.main(base + ["--output_dir", str(tmp_path / "clean")]) == 0
    killed = sh("tests/kill_after.py", "tracin", "3", *base, "--output_dir", tmp_path / "resumed")
    assert killed.returncode == -9 and not (tmp_path / "resumed" / "run.json").exists()
    assert efficient_tracin.main(base + ["--output_dir", str(tmp_path / "resumed")]) == 0
    for n in RESULT_ARRAYS:
        np.testing.assert_array_equal(np.load(tmp_path / "clean" / f"{n}.npy"), np.load(tmp_path / "resumed" / f"{n}.npy"), err_msg=n)
