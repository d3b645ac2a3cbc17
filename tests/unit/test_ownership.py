"""lib.ownership's two verbs: Owner.folder (replace whole, or fill in place) and Owner.claim (files in a shared folder)."""
import pytest

from lib.cli import UserError
from lib.files import save_json
from lib.ownership import OWNER_MARKER, Owner, remove_claimed
from tests.helpers import make_raw_tree

import prepare_data


def test_prepare_overwrite_keeps_a_file_of_yours_put_in_the_prepared_folder(tmp_path):
    raw, out = make_raw_tree(tmp_path / "raw", per_class=3), tmp_path / "processed"
    base = ["--raw_dir", str(raw), "--out_dir", str(out), "--image_size", "8", "--num_workers", "0"]
    assert prepare_data.main(base) == 0
    (out / "my_notes.txt").write_text("mine")
    assert prepare_data.main(base + ["--seed", "3", "--overwrite"]) == 0
    assert (out / "manifest.csv").is_file() and not (out / "my_notes.txt").exists()
    kept = [p.read_text() for p in tmp_path.glob("processed.kept-*/my_notes.txt")]
    assert kept == ["mine"]  # moved beside the new folder, not deleted (the old swap removed it with rmtree)


def test_the_swap_and_the_removal_check_the_owner_again(tmp_path):
    a, b = Owner("tool_a"), Owner("tool_b")
    target = a.folder(tmp_path / "out", "--out_dir")
    with target as build:
        save_json(build / "x.json", {"v": 1})
    assert (tmp_path / "out" / "x.json").is_file()
    (tmp_path / "out" / OWNER_MARKER).write_text("tool_b\n")  # the folder became another tool's meanwhile
    with pytest.raises(UserError, match="tool_b's folder"):
        with target:
            pass
    with pytest.raises(UserError, match="not written by tool_a"):
        target.remove()
    assert (tmp_path / "out" / "x.json").is_file()
    with pytest.raises(UserError, match="tool_a wrote"):  # nor may tool_b take a folder holding tool_a's records
        b.folder(tmp_path / "out")


def test_fill_in_place_and_remove_only_what_was_recorded(tmp_path):
    a = Owner("tool_a")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.jpg").write_bytes(b"mine")
    with pytest.raises(UserError, match="did not write"):
        a.folder(tmp_path / "mine", "--out_dir")
    f = a.folder(tmp_path / "ckpt", "--checkpoint_dir").fill()
    save_json(f.path / "a.json", {"v": 1})
    save_json(f.path / "b.json", {"v": 2})
    (f.path / "b.json").write_text("changed by you")
    (f.path / "c.txt").write_text("yours")
    assert f.remove(f.path / "a.json") and not (f.path / "a.json").exists()
    assert not f.remove(f.path / "b.json")
    f = a.folder(tmp_path / "ckpt").fill(start_over=True)
    assert sorted(p.name for p in f.path.iterdir() if p.name != OWNER_MARKER and not p.name.startswith(".written")) == \
        ["b.json", "c.txt"]


def test_claimed_files_in_a_shared_folder_go_only_while_unchanged(tmp_path):
    a = Owner("tool_a")
    for name in ("x.csv", "y.csv"):
        (tmp_path / name).write_text(name)
    a.claim(tmp_path, ["x.csv", "y.csv"])
    (tmp_path / "y.csv").write_text("edited")
    assert remove_claimed(tmp_path, ["x.csv", "y.csv"]) == ["x.csv"]
    assert (tmp_path / "y.csv").read_text() == "edited"


def test_discard_removes_only_inside_the_folder_being_built(tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("mine")
    folder = Owner("a_tool").folder(tmp_path / "out")
    with pytest.raises(UserError, match="not inside the folder a_tool is building"):
        folder.discard(mine)  # no build yet
    with folder as build:
        (build / "scratch").mkdir()
        (build / "scratch" / "x.bin").write_bytes(b"x")
        (build / "kept.txt").write_text("kept")
        folder.discard(build / "scratch")
        for outside in (mine, build, tmp_path):
            with pytest.raises(UserError, match="not inside"):
                folder.discard(outside)
    assert not (tmp_path / "out" / "scratch").exists() and (tmp_path / "out" / "kept.txt").read_text() == "kept"
    assert mine.read_text() == "mine"
