"""One model explained: TracIn's default trajectory ends at the model train.py selected (the one evaluate.py and
false_prediction.py report), its checkpoints are one training run of this data split in epoch order, and every output
that joins predictions with the lists refuses another model."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import make_random_checkpoints
from lib.checkpoints import SELECTED, load_checkpoint, model_record, save_checkpoint, weights_sha256
from lib.cli import UserError
from lib.data_utils import list_split
from lib.files import file_sha256, save_json
from TracIn.core.arguments import TracInConfig
from TracIn.core.factors import selected_trajectory
from TracIn.core.job import tracin_job
from TracIn.core.results import ARRAYS


def tracin(data_dir, out, **settings):
    return tracin_job(TracInConfig(**{"data_dir": str(data_dir), "output_dir": str(out), "top_k": 3, "batch_size": 8,
                                      "num_workers": 0, "score_fn": "tracin", "normalize": "none", **settings}))


def arrays(out) -> dict:
    return {n: np.load(out / f"{n}.npy") for n in ARRAYS if (out / f"{n}.npy").exists()}


def test_evaluation_mispredictions_lists_and_analysis_describe_the_selected_model(prepared, tmp_path):
    import evaluate
    import false_prediction
    import train
    from TracIn import analyze_misprediction_influences

    ckpt_dir, models = tmp_path / "ckpt", tmp_path / "models"
    assert train.main(["--data_dir", str(prepared), "--arch", "resnet18", "--epochs", "3", "--batch_size", "4",
                       "--weights", "none", "--save_checkpoints_every", "2", "--checkpoint_dir", str(ckpt_dir),
                       "--models_dir", str(models), "--num_workers", "0", "--no-hflip", "--learning_rate", "3e-3"]) == 0
    sel = json.loads((ckpt_dir / SELECTED).read_text())
    best = load_checkpoint((models / "best_model.txt").read_text().strip())
    assert sel["epoch"] == best["epoch"] and sel["weights_sha256"] == weights_sha256(best)
    assert sel["sha256"] == file_sha256(sel["path"])

    common = ["--data_dir", str(prepared), "--models_dir", str(models), "--num_workers", "0", "--device", "cpu"]
    assert evaluate.main(common + ["--out_dir", str(tmp_path / "eval")]) == 0
    assert false_prediction.main(common + ["--out_dir", str(tmp_path / "fp")]) == 0
    tracin(prepared, tmp_path / "res", checkpoint_dir=str(ckpt_dir))
    record = json.loads((tmp_path / "res" / "run.json").read_text())

    # the trajectory: every checkpoint before the selected epoch, the selected model last
    n = sel["epoch"]
    assert [c["epoch"] for c in record["checkpoints"]] == [e for e in (2, 3) if e < n] + [n]
    assert record["model"]["weights_sha256"] == sel["weights_sha256"]
    assert json.loads((tmp_path / "eval" / "metrics_test.json").read_text())["model_record"]["weights_sha256"] == sel["weights_sha256"]
    assert json.loads((tmp_path / "fp" / "false_predictions.json").read_text())["model"]["weights_sha256"] == sel["weights_sha256"]
    # the lists' predictions and false_prediction.py agree on the mispredicted test images
    test = list_split(prepared, "test")
    pred = np.load(tmp_path / "res" / "test_pred.npy")
    ids = np.load(tmp_path / "res" / "test_indices.npy")
    fp = pd.read_csv(tmp_path / "fp" / "false_predictions.csv")
    assert set(ids[pred != test.labels[ids]].tolist()) == set(fp[fp.split == "test"]["index"].tolist())
    args = ["--results_dir", str(tmp_path / "res"), "--data_dir", str(prepared)]
    assert analyze_misprediction_influences.main(args + ["--false_predictions", str(tmp_path / "fp" / "false_predictions.csv"),
                                                         "--out_dir", str(tmp_path / "mis")]) == 0

    # mispredictions of another model of the same run: refused, naming both models
    other = next(p for p in sorted(ckpt_dir.glob("finetune_epoch_*.pth"))
                 if weights_sha256(load_checkpoint(p)) != sel["weights_sha256"])
    assert false_prediction.main(common + ["--out_dir", str(tmp_path / "fp2"), "--model", str(other)]) == 0
    with pytest.raises(UserError, match="different models"):
        analyze_misprediction_influences.main(args + ["--false_predictions", str(tmp_path / "fp2" / "false_predictions.csv"),
                                                      "--out_dir", str(tmp_path / "mis2")])
    # --all_checkpoints explains the last checkpoint, and says so in the record
    tracin(prepared, tmp_path / "all", checkpoint_dir=str(ckpt_dir), all_checkpoints=True)
    everything = json.loads((tmp_path / "all" / "run.json").read_text())
    assert [c["epoch"] for c in everything["checkpoints"]] == [2, 3]
    assert everything["model"]["epoch"] == 3 and "--all_checkpoints" in everything["checkpoints_chosen"]


def test_a_selected_epoch_without_a_checkpoint_ends_the_trajectory_with_the_best_model_file(prepared, tmp_path):
    names = list_split(prepared, "train").class_names
    paths = make_random_checkpoints(tmp_path / "src", names, n=3)
    ckpt_dir, models = tmp_path / "ckpt", tmp_path / "models"
    ckpt_dir.mkdir()
    models.mkdir()
    shutil.copy(paths[0], ckpt_dir / "finetune_epoch_2.pth")  # checkpoints of epochs 2 and 4, the selection at 3
    shutil.copy(paths[2], ckpt_dir / "finetune_epoch_4.pth")
    for name, epoch in (("finetune_epoch_2.pth", 2), ("finetune_epoch_4.pth", 4)):
        c = load_checkpoint(ckpt_dir / name)
        save_checkpoint({**c, "epoch": epoch}, ckpt_dir / name)
    best = {**load_checkpoint(paths[1]), "epoch": 3}
    save_checkpoint(best, models / "Resnet18_x_val.pth")
    record = {**model_record(models / "Resnet18_x_val.pth", best), "sha256": file_sha256(models / "Resnet18_x_val.pth")}
    save_json(ckpt_dir / SELECTED, record)

    found, why = selected_trajectory(ckpt_dir, all_checkpoints=False)
    assert found == [ckpt_dir / "finetune_epoch_2.pth", models / "Resnet18_x_val.pth"] and "epoch 3" in why
    found, why = selected_trajectory(ckpt_dir, all_checkpoints=True)
    assert found == [ckpt_dir / "finetune_epoch_2.pth", ckpt_dir / "finetune_epoch_4.pth"]

    tracin(prepared, tmp_path / "res", checkpoint_dir=str(ckpt_dir))
    rec = json.loads((tmp_path / "res" / "run.json").read_text())
    assert [c["epoch"] for c in rec["checkpoints"]] == [2, 3] and rec["model"]["weights_sha256"] == weights_sha256(best)

    # the selected model changed since training: refused with the way out
    save_checkpoint({**best, "lr": 123.0}, models / "Resnet18_x_val.pth")
    with pytest.raises(UserError, match="--all_checkpoints"):
        selected_trajectory(ckpt_dir, all_checkpoints=False)


@pytest.fixture
def three(prepared, tmp_path):
    """Three checkpoints of one (hand-made) training run of the prepared data."""
    names = list_split(prepared, "train").class_names
    paths = make_random_checkpoints(tmp_path / "ckpt", names, n=3)
    for p in paths:
        save_checkpoint({**load_checkpoint(p), "train_run": "a" * 16}, p)
    return paths


def test_checkpoints_given_out_of_order_are_taken_by_their_recorded_epoch(prepared, three, tmp_path):
    tracin(prepared, tmp_path / "sorted", checkpoints=[str(p) for p in three])
    tracin(prepared, tmp_path / "shuffled", checkpoints=[str(p) for p in (three[2], three[0], three[1])])
    a, b = arrays(tmp_path / "sorted"), arrays(tmp_path / "shuffled")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    rec = json.loads((tmp_path / "shuffled" / "run.json").read_text())
    assert [c["epoch"] for c in rec["checkpoints"]] == [1, 2, 3] and rec["model"]["epoch"] == 3


def test_checkpoints_of_two_runs_or_of_another_split_are_refused(prepared, three, tmp_path):
    mixed = tmp_path / "other_run.pth"
    save_checkpoint({**load_checkpoint(three[1]), "train_run": "b" * 16}, mixed)
    with pytest.raises(UserError, match="different training runs"):
        tracin(prepared, tmp_path / "mixed", checkpoints=[str(three[0]), str(mixed), str(three[2])])
    other_split = tmp_path / "other_split.pth"
    save_checkpoint({**load_checkpoint(three[2]), "split_key": "0123456789abcdef"}, other_split)
    with pytest.raises(UserError, match="another split"):
        tracin(prepared, tmp_path / "split", checkpoints=[str(three[0]), str(three[1]), str(other_split)])
    twice = tmp_path / "twice.pth"
    shutil.copy(three[1], twice)
    with pytest.raises(UserError, match="epoch 2"):
        tracin(prepared, tmp_path / "twice", checkpoints=[str(three[0]), str(three[1]), str(twice)])
    assert not (tmp_path / "mixed" / "run.json").exists() and not (tmp_path / "split" / "run.json").exists()


# ---------------------------------------------------------------- found by the hostile probe, fixed at their causes
def test_a_selection_record_of_other_types_or_weights_is_refused(prepared, tmp_path):
    names = list_split(prepared, "train").class_names
    paths = make_random_checkpoints(tmp_path / "ckpt", names, n=3)  # epochs 1..3
    rec = {**model_record(paths[2], load_checkpoint(paths[2])), "sha256": file_sha256(paths[2])}
    for epoch in (True, 2.7, "3", 0):
        save_json(tmp_path / "ckpt" / SELECTED, {**rec, "epoch": epoch})
        with pytest.raises(UserError, match="not train.py's record"):
            selected_trajectory(tmp_path / "ckpt", all_checkpoints=False)
    save_json(tmp_path / "ckpt" / SELECTED, {**rec, "epoch": 2})  # names epoch 2, whose checkpoint has other weights
    with pytest.raises(UserError, match="not the model train.py selected"):
        selected_trajectory(tmp_path / "ckpt", all_checkpoints=False)
    save_json(tmp_path / "ckpt" / SELECTED, rec)
    assert selected_trajectory(tmp_path / "ckpt", all_checkpoints=False)[0] == paths


def test_resuming_a_copied_run_elsewhere_keeps_the_original_runs_best_model(prepared, tmp_path):
    import train

    flags = ["--data_dir", str(prepared), "--arch", "resnet18", "--batch_size", "4", "--weights", "none", "--num_workers", "0",
             "--no-hflip", "--save_checkpoints_every", "1"]
    assert train.main(flags + ["--epochs", "1", "--checkpoint_dir", str(tmp_path / "a" / "ckpt"),
                               "--models_dir", str(tmp_path / "a" / "models")]) == 0
    before = {p.name: file_sha256(p) for p in (tmp_path / "a" / "models").glob("*.pth")}
    assert before
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    last = load_checkpoint(tmp_path / "b" / "ckpt" / "last.pth")
    save_checkpoint({**last, "best": {**last["best"], "acc": -1.0}}, tmp_path / "b" / "ckpt" / "last.pth")  # epoch 2 is a new best
    assert train.main(flags + ["--epochs", "2", "--resume", "--checkpoint_dir",
                               str(tmp_path / "b" / "ckpt"), "--models_dir", str(tmp_path / "b" / "models")]) == 0
    assert list((tmp_path / "b" / "models").glob("*.pth"))  # the resumed run keeps a best model of its own
    assert {p.name: file_sha256(p) for p in (tmp_path / "a" / "models").glob("*.pth")} == before
    # a copy resumed into the original's own --models_dir: its record names the original's folder, not its own
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    save_checkpoint({**last, "best": {**last["best"], "acc": -1.0}}, tmp_path / "c" / "ckpt" / "last.pth")
    assert train.main(flags + ["--epochs", "2", "--resume", "--checkpoint_dir", str(tmp_path / "c" / "ckpt"),
                               "--models_dir", str(tmp_path / "a" / "models")]) == 0
    assert all(file_sha256(tmp_path / "a" / "models" / n) == h for n, h in before.items())
    # a user's file under the name of the best model is never overwritten: the same run again, into a folder holding it
    name = next(iter(before))
    (tmp_path / "d" / "models").mkdir(parents=True)
    (tmp_path / "d" / "models" / name).write_text("precious")
    with pytest.raises(UserError, match="not a model train.py wrote"):
        train.main(flags + ["--epochs", "1", "--checkpoint_dir", str(tmp_path / "d" / "ckpt"),
                            "--models_dir", str(tmp_path / "d" / "models")])
    assert (tmp_path / "d" / "models" / name).read_text() == "precious"


def test_train_refuses_a_results_folder_and_readers_refuse_replaced_arrays_or_a_null_digest(prepared, trained, tmp_path):
    import train
    import TracIn
    from TracIn.core.results import load_results

    res = tmp_path / "res"
    shutil.copytree(trained / "res", res)
    before = sorted(p.name for p in res.rglob("*"))
    with pytest.raises(UserError, match="efficient_tracin wrote"):
        train.main(["--data_dir", str(prepared), "--arch", "resnet18", "--epochs", "1", "--weights", "none",
                    "--checkpoint_dir", str(res), "--models_dir", str(tmp_path / "m"), "--num_workers", "0"])
    assert sorted(p.name for p in res.rglob("*")) == before

    record = json.loads((res / "run.json").read_text())
    record["identity"]["factors_sha256"] = None
    (res / "run.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="no usable digest"):
        TracIn.open(res, data_dir=str(prepared)).run.factors()

    pred = np.load(res / "test_pred.npy")
    np.save(res / "test_pred.npy", np.zeros_like(pred))  # well-formed, in range: only its bytes say it is not the run's
    with pytest.raises(UserError, match="not the file efficient_tracin wrote"):
        load_results(res)


def test_a_curvature_with_nothing_to_invert_is_one_line():
    from TracIn.core.curvature import KroneckerCurvature

    with pytest.raises(UserError, match="cannot be inverted"):
        KroneckerCurvature.damped_inverses(torch.eye(3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64), 10.0)


def test_members_of_other_training_settings_are_refused(prepared, tmp_path):
    names = list_split(prepared, "train").class_names
    folders = []
    for k, lr in enumerate((1e-3, 5e-2)):
        paths = make_random_checkpoints(tmp_path / f"m{k}", names, n=2, seed=100 + 10 * k)
        for p in paths:
            save_checkpoint({**load_checkpoint(p), "train_run": f"{k}" * 16}, p)
        save_json(tmp_path / f"m{k}" / "train_args.json", {"learning_rate": lr, "batch_size": 4, "epochs": 2,
                                                             "lr_schedule": "constant", "weight_decay": 0.0,
                                                             "image_size": 32, "hflip": False})
        folders.append(str(tmp_path / f"m{k}"))
    with pytest.raises(UserError, match="other settings"):
        tracin(prepared, tmp_path / "ens", members=folders)
