"""prepare_data -> train -> evaluate on a tiny generated image tree, and their error paths."""
import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import evaluate
from lib.cli import UserError
from lib import prediction
import prepare_data
import train
from lib.data_utils import list_split, load_rgb
from lib.checkpoints import find_checkpoints, load_checkpoint, model_from_checkpoint
from model_architecture import build_model
from helpers import make_raw_tree


def test_prepare_outputs_rgb_resized_split_with_manifest(prepared):
    man = pd.read_csv(prepared / "manifest.csv")
    assert sorted(man.class_name.unique()) == ["cat", "dog", "spider"]  # Italian -> English
    skipped = pd.read_csv(prepared / "skipped.csv")
    assert sorted(p.split("/")[-1] for p in skipped.source_path) == ["empty.jpg", "notes.txt", "truncated.jpg"]
    assert len(man) == 24  # 3 classes x 8 readable images
    assert (man[man.split == "test"].groupby("class_name").size() == 2).all()  # stratified 25%
    for split in ("train", "test"):
        listing = list_split(prepared, split)
        rows = man[man.split == split].sort_values("index")
        assert list(rows.path) == listing.paths and list(rows.label) == list(listing.labels)
    for p in man.path:
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
    gt = pd.read_csv(prepared / "mislabeled_ground_truth.csv")
    assert len(gt) == 2  # round(0.1 * 18)
    train_rows = man[man.split == "train"].set_index("index")
    for _, r in gt.iterrows():
        assert train_rows.loc[r.train_index, "path"] == r.path
        assert train_rows.loc[r.train_index, "class_name"] == r.given_class != r.true_class


def test_load_rgb_converts_odd_modes(tmp_path):
    make_raw_tree(tmp_path / "raw", per_class=8)
    for p in (tmp_path / "raw" / "cane").glob("img_*"):
        assert load_rgb(p).mode == "RGB"
    exif = load_rgb(tmp_path / "raw" / "cane" / "img_06.jpg")
    assert exif.size == (20, 24)  # EXIF orientation 6 rotates the 24x20 image
    with pytest.raises(ValueError, match="cannot read"):
        load_rgb(tmp_path / "raw" / "cane" / "truncated.jpg")


def test_prepare_is_idempotent_and_refuses_other_split(prepared, capsys):
    raw = json.loads((prepared / "prepare_args.json").read_text())["raw_dir"]
    before = (prepared / "manifest.csv").stat().st_mtime_ns
    args = ["--raw_dir", raw, "--out_dir", str(prepared), "--image_size", "32", "--test_fraction", "0.25", "--val_fraction", "0",
            "--label_noise", "0.1", "--num_workers", "0"]
    assert prepare_data.main(args) == 0
    assert (prepared / "manifest.csv").stat().st_mtime_ns == before
    with pytest.raises(prepare_data.UserError, match="--overwrite"):
        prepare_data.main(args[:-4] + ["--seed", "3"])
    assert (prepared / "manifest.csv").stat().st_mtime_ns == before  # nothing lost


def test_prepare_is_deterministic(tmp_path):
    make_raw_tree(tmp_path / "raw")
    outs = []
    for name in ("a", "b"):
        prepare_data.main(["--raw_dir", str(tmp_path / "raw"), "--out_dir", str(tmp_path / name), "--image_size", "16",
                           "--label_noise", "0.2", "--num_workers", "2"])
        m = pd.read_csv(tmp_path / name / "manifest.csv")
        outs.append(m.assign(path=m.path.str.replace(str(tmp_path / name), "")))
    pd.testing.assert_frame_equal(*outs)


@pytest.mark.parametrize("setup,message", [
    (lambda r: None, "does not exist"),
    (lambda r: r.mkdir(), "no class folders"),
    (lambda r: (r / "cane").mkdir(parents=True), "only one class"),
    (lambda r: ((r / "cane").mkdir(parents=True), (r / "gatto").mkdir()), "hold no files"),
    (lambda r: ((r / "cane").mkdir(parents=True), (r / "gatto").mkdir(), (r / "cane" / "x.jpg").write_bytes(b"no"),
                (r / "gatto" / "y.jpg").write_bytes(b"no")), "no readable image"),
])
def test_prepare_bad_raw_dir_is_one_line_exit_2(tmp_path, setup, message):
    raw = tmp_path / "raw"
    setup(raw)
    out = subprocess.run([sys.executable, "prepare_data.py", "--raw_dir", str(raw), "--out_dir", str(tmp_path / "out"),
                          "--num_workers", "0"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_flag_out_of_range_exits_2():
    out = subprocess.run([sys.executable, "train.py", "--epochs", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "out of range" in out.stderr and "Traceback" not in out.stderr


def test_train_evaluate_end_to_end_and_resume(prepared, tmp_path):
    ckpt, models = tmp_path / "ckpt", tmp_path / "models"
    base = ["--data_dir", str(prepared), "--arch", "resnet18", "--batch_size", "8", "--learning_rate", "1e-3",
            "--weights", "none", "--checkpoint_dir", str(ckpt), "--models_dir", str(models), "--num_workers", "0",
            "--save_checkpoints_every", "1", "--lr_schedule", "cosine"]
    assert train.main(base + ["--epochs", "1"]) == 0
    with pytest.raises(train.UserError, match="--resume"):
        train.main(base + ["--epochs", "2"])
    assert train.main(base + ["--epochs", "2", "--resume"]) == 0
    paths = find_checkpoints(ckpt)
    assert [p.name for p in paths] == ["finetune_epoch_1.pth", "finetune_epoch_2.pth"]
    c1, c2 = (load_checkpoint(p) for p in paths)
    assert c1["class_names"] == ["cat", "dog", "spider"] and c2["epoch"] == 2 and c1["image_size"] == 32
    assert c1["lr"] == pytest.approx(1e-3) and c2["lr"] == pytest.approx(0.5e-3)  # cosine over 2 epochs
    assert set(c2["metrics"]) == {"train_loss", "train_acc", "val_loss", "val_acc"}
    assert not torch.equal(c1["model_state"]["fc.weight"], c2["model_state"]["fc.weight"])
    best = (models / "best_model.txt").read_text().strip()
    assert best.startswith(str(models / "Resnet18_animals10_val_")) and best.endswith(".pth")
    assert len(list(models.glob("*_val_*.pth"))) == 1

    out = tmp_path / "eval"
    assert evaluate.main(["--data_dir", str(prepared), "--models_dir", str(models), "--out_dir", str(out), "--num_workers", "0"]) == 0
    metrics = json.loads((out / "metrics_test.json").read_text())
    preds = pd.read_csv(out / "predictions_test.csv")
    assert metrics["n"] == len(preds) == 6
    assert metrics["accuracy"] == pytest.approx(preds.correct.mean())
    cm = pd.read_csv(out / "confusion_matrix_test.csv")
    assert cm[["cat", "dog", "spider"]].to_numpy().sum() == 6
    assert (out / "confusion_matrix_test.png").stat().st_size > 1000
    # the checkpoint's model reproduces evaluate's predictions
    model = model_from_checkpoint(load_checkpoint(best))
    assert isinstance(model.fc, torch.nn.Linear) and model.fc.out_features == 3


def test_checkpoint_of_another_model_is_refused(prepared, tmp_path):
    torch.save(build_model("resnet18", 3).state_dict(), tmp_path / "bare.pth")
    with pytest.raises(UserError, match="not a checkpoint"):
        evaluate.main(["--data_dir", str(prepared), "--model", str(tmp_path / "bare.pth")])
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot load"):
        evaluate.main(["--data_dir", str(prepared), "--model", str(tmp_path / "junk.pth")])
    from helpers import make_random_checkpoints

    (p,) = make_random_checkpoints(tmp_path / "c", ["a", "b"], n=1)
    with pytest.raises(UserError, match="trained on classes"):
        evaluate.main(["--data_dir", str(prepared), "--model", str(p)])
    with pytest.raises(train.UserError, match="does not hold resnet50 weights"):
        build_model("resnet50", 3, weights=str(tmp_path / "bare.pth"))


def test_metrics_from_logits():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]], dtype=np.float32)
    m = prediction.metrics_from_logits(logits, np.array([0, 0, 1]), 2)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["confusion"].tolist() == [[1, 1], [1, 0]]
    assert m["per_class_accuracy"][0] == 0.5 and m["per_class_accuracy"][1] == 0.0


def test_label_noise_never_overwrites_a_file_with_the_same_name(tmp_path):
    # every class holds img_00..img_19: noisy moves land in folders holding the same names
    make_raw_tree(tmp_path / "raw", per_class=20)
    prepare_data.main(["--raw_dir", str(tmp_path / "raw"), "--out_dir", str(tmp_path / "out"), "--image_size", "8",
                       "--label_noise", "0.5", "--num_workers", "0"])
    man = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert len(man) == 60 and man.path.is_unique and man.source_path.is_unique
    assert all(Path(p).exists() for p in man.path)


def test_file_and_class_names_that_are_not_utf8_are_prepared(tmp_path):
    """A class folder and a file whose names are bytes that are not UTF-8 (any Linux file system allows them): prepared
    under a %xx spelling, listed in the manifest and skipped.csv, no traceback."""
    raw = make_raw_tree(tmp_path / "raw")
    bad_class = os.fsdecode(b"gatt\xf6")
    os.rename(tmp_path / "raw" / "gatto", tmp_path / "raw" / bad_class)
    good = (tmp_path / "raw" / "cane" / "img_00.jpg").read_bytes()
    (tmp_path / "raw" / "cane" / os.fsdecode(b"\xff\xfe photo.jpg")).write_bytes(good)
    (tmp_path / "raw" / "cane" / os.fsdecode(b"bad\xe9.jpg")).write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "prepare_data.py", "--raw_dir", str(raw), "--out_dir", str(out), "--image_size", "8",
                          "--num_workers", "0"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    manifest = pd.read_csv(out / "manifest.csv")
    assert "gatt%xf6" in set(manifest.class_name)
    assert any(p.endswith("%xff%xfe photo.jpg") for p in manifest.path)
    assert all(Path(p).exists() for p in manifest.path)
    assert any("bad%xe9.jpg" in p for p in pd.read_csv(out / "skipped.csv").source_path)
    assert len(manifest) == 3 * 8 + 1


def test_raw_files_changed_since_preparing_are_noticed(tmp_path):
    raw = make_raw_tree(tmp_path / "raw")
    args = ["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out"), "--image_size", "8", "--num_workers", "0"]
    assert prepare_data.main(args) == 0
    n = len(pd.read_csv(tmp_path / "out" / "manifest.csv"))
    assert prepare_data.prepare(prepare_data.parse_args(args))["skipped_run"]  # the same arguments and files: nothing to do
    good = (raw / "cane" / "img_00.jpg").read_bytes()
    (raw / "cane" / "added.jpg").write_bytes(good)
    with pytest.raises(UserError, match="raw files .* changed"):
        prepare_data.main(args)
    assert prepare_data.main(args + ["--overwrite"]) == 0
    assert len(pd.read_csv(tmp_path / "out" / "manifest.csv")) == n + 1
    os.rename(raw / "cane" / "added.jpg", raw / "cane" / "renamed.jpg")
    assert prepare_data.main(args + ["--overwrite"]) == 0  # not "nothing to do"
    assert any(p.endswith("renamed.jpg") for p in pd.read_csv(tmp_path / "out" / "manifest.csv").path)


def test_a_model_is_never_evaluated_on_another_split_and_resume_keeps_its_data_and_epochs(tmp_path):
    """Re-prepared with another --seed: evaluate.py refused the old model (its test images may be its training images)
    and train.py --resume refused to continue on the new split; --resume --epochs below the epochs done is refused."""
    raw = make_raw_tree(tmp_path / "raw")
    prep = ["--raw_dir", str(raw), "--out_dir", str(tmp_path / "p"), "--image_size", "8", "--num_workers", "0"]
    assert prepare_data.main(prep) == 0
    common = ["--data_dir", str(tmp_path / "p"), "--arch", "resnet18", "--batch_size", "4", "--weights", "none",
              "--checkpoint_dir", str(tmp_path / "ck"), "--models_dir", str(tmp_path / "m"), "--num_workers", "0"]
    assert train.main(common + ["--epochs", "2"]) == 0
    ev = ["--models_dir", str(tmp_path / "m"), "--data_dir", str(tmp_path / "p"), "--out_dir", str(tmp_path / "ev"),
          "--num_workers", "0"]
    assert evaluate.main(ev) == 0
    record = json.loads((tmp_path / "ev" / "metrics_test.json").read_text())
    assert record["selected_on"] == "val" and 0 <= record["selection_accuracy"] <= 1
    with pytest.raises(UserError, match="already trained 2 epochs"):
        train.main(common + ["--resume", "--epochs", "1"])
    assert json.loads((tmp_path / "ck" / "train_args.json").read_text())["epochs"] == 2  # not rewritten
    assert prepare_data.main(prep + ["--seed", "3", "--overwrite"]) == 0
    with pytest.raises(UserError, match="another split"):
        evaluate.main(ev)
    with pytest.raises(UserError, match="training split .* changed"):
        train.main(common + ["--resume", "--epochs", "3"])
