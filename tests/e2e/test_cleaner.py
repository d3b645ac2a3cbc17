"""Issue 34's cleaner and output-folder cases: a file is removed only while its content is what its tool recorded
writing (never because of its name or a marker), and every writer refuses a folder another tool marked as its own.
Each test failed on the code before this change."""
import logging
import shutil
from pathlib import Path

import pytest

import clean_results
import train
from helpers import checksums
from lib.cli import UserError
from lib.data_utils import list_split
from lib.ownership import OWNER_MARKER
from TracIn import efficient_tracin as et
from TracIn import explain


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def clean(tmp_path, **dirs):
    argv = []
    for flag in ("results_dir", "false_predictions", "checkpoint_dir", "eval_dir"):
        argv += [f"--{flag}", str(dirs.get(flag, tmp_path / "none"))]
    assert clean_results.main(argv) == 0


def one_line(fn, argv, *needles):
    with pytest.raises(UserError) as e:
        fn(argv)
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)


def test_clean_results_of_a_parent_folder_removes_no_data_checkpoints_members_or_marked_folder(prepared, trained, tmp_path):
    models = tmp_path / "models"
    copy(prepared, models / "processed")
    copy(trained / "ckpt", models / "checkpoints")
    (models / "checkpoints" / "my_photo.jpg").write_bytes(b"mine")
    members = models / "members"
    copy(trained / "ckpt", members / "member_1")
    (members / OWNER_MARKER).write_text("ensemble\n")
    (models / "unrecorded").mkdir()  # a marker alone, no record of what was written: proves nothing
    (models / "unrecorded" / OWNER_MARKER).write_text("efficient_tracin\n")
    (models / "unrecorded" / "notes.md").write_text("mine")
    before = checksums(models)
    clean(tmp_path, results_dir=models)
    assert checksums(models) == before


def test_clean_keeps_a_users_file_in_a_tool_folder_and_says_it(trained, tmp_path, caplog):
    ckpt, res = copy(trained / "ckpt", tmp_path / "ckpt"), copy(trained / "res", tmp_path / "res")
    # a checkpoint of the user's under the name of an epoch this 2-epoch run never trained
    (ckpt / "finetune_epoch_7.pth").write_bytes((ckpt / "finetune_epoch_1.pth").read_bytes()[:-1] + b"x")
    (res / "factors" / "mine.txt").write_text("my notes")
    with caplog.at_level(logging.WARNING):
        clean(tmp_path, results_dir=res, checkpoint_dir=ckpt)
    assert sorted(p.name for p in ckpt.iterdir() if p.name != OWNER_MARKER) == ["finetune_epoch_7.pth"]
    left = [p for p in (res / "factors").rglob("*") if p.is_file() and p.name != OWNER_MARKER]
    assert left == [res / "factors" / "mine.txt"] and left[0].read_text() == "my notes"
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "mine.txt" in said and "finetune_epoch_7.pth" in said
    assert not (res / "run.json").exists()


def test_clean_keeps_a_recorded_file_that_changed_since(trained, tmp_path):
    ckpt = copy(trained / "ckpt", tmp_path / "ckpt")
    edited = ckpt / "train_args.json"
    edited.write_text(edited.read_text() + " ")
    clean(tmp_path, checkpoint_dir=ckpt)
    assert edited.exists() and not (ckpt / "finetune_epoch_1.pth").exists()


def test_clean_says_the_results_it_keeps_because_they_changed_since(trained, tmp_path, caplog):
    res = copy(trained / "res", tmp_path / "res")
    table = res / "top_k_influences.csv"
    table.write_text(table.read_text() + "# my edit\n")
    with caplog.at_level(logging.WARNING):
        clean(tmp_path, results_dir=res)
    assert table.read_text().endswith("# my edit\n") and not (res / "run.json").exists()
    assert "top_k_influences.csv" in " ".join(r.getMessage() for r in caplog.records)


def test_writers_refuse_another_tools_folder(prepared, trained, tmp_path):
    data, ckpt = copy(prepared, tmp_path / "data"), copy(trained / "ckpt", tmp_path / "ckpt")
    before = {"data": checksums(data), "ckpt": checksums(ckpt)}
    one_line(train.main, ["--data_dir", str(prepared), "--checkpoint_dir", str(data), "--models_dir", str(tmp_path / "m"),
                          "--epochs", "1", "--weights", "none", "--num_workers", "0"], "prepare_data.py's folder", "--checkpoint_dir")
    for out in (data, ckpt):
        one_line(et.main, ["--data_dir", str(prepared), "--checkpoint_dir", str(trained / "ckpt"), "--output_dir", str(out),
                           "--top_k", "2", "--num_workers", "0"], "'s folder", "--output_dir")
    assert {"data": checksums(data), "ckpt": checksums(ckpt)} == before
    marked = tmp_path / "empty"
    marked.mkdir()
    (marked / OWNER_MARKER).write_text("train.py\n")
    image = list_split(prepared, "test").paths[0]
    one_line(explain.main, ["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--out_dir", str(marked),
                            str(image)], "train.py's folder")
    assert sorted(p.name for p in marked.iterdir()) == [OWNER_MARKER]


def test_efficient_tracin_refuses_another_tools_output_folder(prepared, trained, tmp_path):
    import false_prediction

    fp = tmp_path / "fp"
    assert false_prediction.main(["--data_dir", str(prepared), "--models_dir", str(trained / "models"), "--out_dir", str(fp),
                                  "--num_workers", "0", "--device", "cpu"]) == 0
    before = checksums(fp)
    with pytest.raises(UserError, match="false_prediction wrote"):
        et.main(["--data_dir", str(prepared), "--checkpoint_dir", str(trained / "ckpt"), "--output_dir", str(fp),
                 "--top_k", "2", "--num_workers", "0"])
    assert checksums(fp) == before


def test_clean_results_pointed_at_a_prepared_or_checkpoint_folder_removes_nothing_of_it(prepared, trained, tmp_path):
    # every flag aimed at the prepared data and the checkpoints themselves (not a shared folder above them): their
    # tools claimed every file there, but they are data and models, not results
    data, ckpt = copy(prepared, tmp_path / "data"), copy(trained / "ckpt", tmp_path / "ckpt")
    before = checksums(tmp_path)
    clean(tmp_path, results_dir=data, false_predictions=ckpt, eval_dir=data, checkpoint_dir=data)
    assert checksums(tmp_path) == before
