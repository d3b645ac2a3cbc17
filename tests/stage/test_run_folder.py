"""The run folder: one subfolder per tool, built whole with the identity of its inputs, checked by readers."""
import json
import os
import shutil

import pandas as pd
import pytest

import demo_report
from lib.cli import UserError
from lib.files import usual_mode
from TracIn import mislabel_detection
from TracIn.core.arguments import TracInConfig
from TracIn.core.job import tracin_job
from TracIn.core.results import load_results, run_id
from TracIn.core.run_folder import current, tool_folder


def detect(prepared, trained, res):
    return mislabel_detection.main(["--results_dir", str(res), "--data_dir", str(prepared), "--checkpoint_dir", str(trained / "ckpt")])


def test_a_tool_folder_records_its_run_and_links_the_notebook_path(prepared, trained, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(trained / "res", res)
    assert detect(prepared, trained, res) == 0
    rid = run_id(load_results(res).record)
    inputs = json.loads((res / "mislabel" / "inputs.json").read_text())
    assert inputs["tool"] == "mislabel_detection" and inputs["tracin_run"] == rid
    link = res / "mislabel_candidates.csv"
    assert link.is_symlink() and os.readlink(link) == "mislabel/mislabel_candidates.csv"
    assert pd.read_csv(link).equals(pd.read_csv(res / "mislabel" / "mislabel_candidates.csv"))
    assert current(res, "mislabel", rid) == res / "mislabel"
    # as readable as mkdir and open() make them under this umask (not mkdtemp's 0700, mkstemp's 0600)
    assert (res / "mislabel").stat().st_mode & 0o777 == usual_mode(folder=True)
    assert (res / "mislabel" / "mislabel_candidates.csv").stat().st_mode & 0o777 == usual_mode()
    assert (res / "run.json").stat().st_mode & 0o777 == usual_mode()

    # a reader of another run's folder: skipped with one note naming it
    notes = []
    assert current(res, "mislabel", "0" * 16, notes) is None
    assert len(notes) == 1 and "mislabel" in notes[0] and "another TracIn run" in notes[0]
    # a folder without inputs.json (hand-made, or of an older version) is not taken for the tool's
    (res / "mislabel" / "inputs.json").unlink()
    notes = []
    assert current(res, "mislabel", rid, notes) is None and "inputs.json" in notes[0]


def test_a_stale_tool_folder_is_refused_by_the_demo_summary(prepared, trained, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(trained / "res", res)
    assert detect(prepared, trained, res) == 0
    kept = tmp_path / "kept"
    shutil.copytree(res / "mislabel", kept)
    tracin_job(TracInConfig(data_dir=str(prepared), checkpoint_dir=str(trained / "ckpt"), output_dir=str(res), top_k=2,
                            num_workers=0, score_fn="tracin", normalize="none"))
    assert not (res / "mislabel").exists() and not os.path.lexists(res / "mislabel_candidates.csv")  # went with the old run
    shutil.copytree(kept, res / "mislabel")  # the previous run's folder, put back by hand
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "metrics_test.json").write_text(json.dumps({"accuracy": 0.5, "n": 6, "model": "m"}))
    with pytest.raises(UserError, match="computed from another TracIn run"):
        demo_report.main(["--results_dir", str(res), "--eval_dir", str(ev)])


def test_a_failed_tool_run_leaves_the_folder_and_a_user_file_under_a_link_name_stays(prepared, trained, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(trained / "res", res)
    assert detect(prepared, trained, res) == 0
    before = (res / "mislabel" / "mislabel_candidates.csv").read_bytes()
    with pytest.raises(RuntimeError):
        with tool_folder(res / "mislabel", "mislabel_detection", {"tracin_run": "x"}) as build:
            (build / "mislabel_candidates.csv").write_text("half")
            raise RuntimeError("killed")
    assert (res / "mislabel" / "mislabel_candidates.csv").read_bytes() == before
    assert json.loads((res / "mislabel" / "inputs.json").read_text())["tracin_run"] != "x"
    os.unlink(res / "mislabel_candidates.csv")
    (res / "mislabel_candidates.csv").write_text("my own table")
    assert detect(prepared, trained, res) == 0
    assert (res / "mislabel_candidates.csv").read_text() == "my own table"
    with pytest.raises(UserError, match="did not write"):  # a folder of yours where the tool's goes
        shutil.rmtree(res / "mislabel")
        (res / "mislabel").mkdir()
        (res / "mislabel" / "notes.txt").write_text("mine")
        detect(prepared, trained, res)
    assert (res / "mislabel" / "notes.txt").read_text() == "mine"


def test_out_dir_is_the_tools_folder_and_the_run_root_is_refused(prepared, trained, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(trained / "res", res)
    mine = tmp_path / "mine"
    assert mislabel_detection.main(["--results_dir", str(res), "--data_dir", str(prepared), "--checkpoint_dir",
                                    str(trained / "ckpt"), "--out_dir", str(mine)]) == 0
    assert (mine / "mislabel_candidates.csv").is_file() and json.loads((mine / "inputs.json").read_text())["tracin_run"] == \
        run_id(load_results(res).record)
    assert not os.path.lexists(res / "mislabel_candidates.csv") and not (res / "mislabel").exists()  # no link for elsewhere
    # the older habit, --out_dir = the results folder: refused with one line, nothing in it changed
    before = sorted(p.name for p in res.iterdir())
    with pytest.raises(UserError, match="did not write"):
        mislabel_detection.main(["--results_dir", str(res), "--data_dir", str(prepared), "--checkpoint_dir",
                                 str(trained / "ckpt"), "--out_dir", str(res)])
    assert sorted(p.name for p in res.iterdir()) == before


@pytest.mark.parametrize("target", ["nowhere.csv", "mine.csv"])
def test_a_link_of_yours_at_a_notebook_path_is_never_re_pointed(prepared, trained, tmp_path, target):
    res = tmp_path / "res"
    shutil.copytree(trained / "res", res)
    (tmp_path / "mine.csv").write_text("my,own\n1,2\n")
    os.symlink(str(tmp_path / target), res / "mislabel_candidates.csv")  # dangling, or to a file of the user's
    assert detect(prepared, trained, res) == 0
    assert os.readlink(res / "mislabel_candidates.csv") == str(tmp_path / target)
    assert (tmp_path / "mine.csv").read_text() == "my,own\n1,2\n"
    assert (res / "mislabel" / "mislabel_candidates.csv").is_file()


def test_analyze_topk_results_writes_beside_the_run_it_reads(prepared, trained, tmp_path, monkeypatch):
    from TracIn import analyze_topk_results

    res = tmp_path / "copy"
    shutil.copytree(trained / "res", res)
    monkeypatch.chdir(tmp_path)
    assert analyze_topk_results.main(["--results_dir", str(res), "--data_dir", str(prepared), "--max_panels", "1",
                                      "--num_correct", "1"]) == 0
    assert (res / "analysis" / "dashboard.png").is_file()
    assert not (tmp_path / "TracIn").exists()  # the default run's folder is not where a copy's analysis goes


def test_mispredictions_of_another_training_run_are_not_mixed_with_this_tracin_run(prepared, trained, tmp_path):
    from helpers import write_false_predictions

    from lib.data_utils import list_split
    from TracIn import analyze_misprediction_influences

    r = load_results(trained / "res")
    run = r.record["checkpoints"][0]["train_run"]
    assert run
    test = list_split(prepared, "test")
    names = test.class_names
    csv = write_false_predictions(tmp_path / "false_predictions.csv", pd.DataFrame({
        "split": ["test"], "index": [0], "path": [test.paths[0]], "true_label": [names[test.labels[0]]],
        "pred_label": [names[(test.labels[0] + 1) % len(names)]], "confidence": [0.9]}), prepared, results_dir=trained / "res")
    args = ["--results_dir", str(trained / "res"), "--data_dir", str(prepared), "--false_predictions", str(csv)]
    record = json.loads(csv.with_suffix(".json").read_text())
    for model_run, ok in (("f" * 16, False), (run, True)):  # a model retrained in place since, then the run's own
        csv.with_suffix(".json").write_text(json.dumps({**record, "train_run": model_run}))
        out = ["--out_dir", str(tmp_path / f"mis_{ok}")]
        if ok:
            assert analyze_misprediction_influences.main(args + out) == 0
        else:
            with pytest.raises(UserError, match="training run"):
                analyze_misprediction_influences.main(args + out)


def test_a_tool_defined_here_is_found_by_its_inputs_cleaned_by_a_new_run_and_refused_when_stale(prepared, trained, tmp_path):
    """Adding a tool edits no core file: a folder this test's tool builds with tool_folder (declaring its own notebook
    link) is read through the one staleness check, and a new TracIn run removes it and its link (found by its
    inputs.json); put back by hand, its reader refuses it (or notes it)."""
    from TracIn.core.run_folder import derived_folders, tool_output

    res = tmp_path / "res"
    shutil.copytree(trained / "res", res)
    rid = run_id(load_results(res).record)

    def load(notes=None):  # the new tool's reader
        return tool_output(res, "my_tool", "my_test_tool", "no my_tool output: run my_test_tool", notes)

    with pytest.raises(UserError, match="no my_tool output"):
        load()
    with tool_folder(res / "my_tool", "my_test_tool", {"tracin_run": rid}, links=["my_table.csv"]) as build:
        (build / "my_table.csv").write_text("a\n1\n")
    assert os.readlink(res / "my_table.csv") == "my_tool/my_table.csv"
    assert derived_folders(res)[res / "my_tool"] == "my_test_tool"
    assert load() == res / "my_tool"
    kept = tmp_path / "kept"
    shutil.copytree(res / "my_tool", kept)
    (res / "mine").mkdir()  # a folder of yours and a file of yours at the root stay
    (res / "mine" / "notes.txt").write_text("mine")
    (res / "mine.txt").write_text("mine")
    tracin_job(TracInConfig(data_dir=str(prepared), checkpoint_dir=str(trained / "ckpt"), output_dir=str(res), top_k=2,
                            num_workers=0, score_fn="tracin", normalize="none"))
    assert not (res / "my_tool").exists() and not os.path.lexists(res / "my_table.csv")
    assert (res / "mine" / "notes.txt").read_text() == "mine" and (res / "mine.txt").read_text() == "mine"
    shutil.copytree(kept, res / "my_tool")  # the previous run's folder, put back by hand
    with pytest.raises(UserError, match="another TracIn run"):
        load()
    notes = []
    assert load(notes) is None and len(notes) == 1 and "my_tool" in notes[0] and "another TracIn run" in notes[0]


def test_a_copy_of_a_tool_folder_under_another_name_is_yours_and_survives_a_new_run(prepared, trained, tmp_path):
    """cp -r res/my_tool res/my_tool_backup copies the tool's marker, record and inputs.json; the copy is still yours:
    a new TracIn run removes the tool's folder, never the backup (a tool deletes only what it can prove it wrote there)."""
    from TracIn.core.run_folder import derived_folders

    res = tmp_path / "res"
    shutil.copytree(trained / "res", res)
    rid = run_id(load_results(res).record)
    with tool_folder(res / "my_tool", "my_test_tool", {"tracin_run": rid}) as build:
        (build / "my_table.csv").write_text("a\n1\n")
    shutil.copytree(res / "my_tool", res / "my_tool_backup")
    assert list(derived_folders(res).values()) == ["my_test_tool"]
    tracin_job(TracInConfig(data_dir=str(prepared), checkpoint_dir=str(trained / "ckpt"), output_dir=str(res), top_k=2,
                            num_workers=0, score_fn="tracin", normalize="none"))
    assert not (res / "my_tool").exists()
    assert (res / "my_tool_backup" / "my_table.csv").read_text() == "a\n1\n"
