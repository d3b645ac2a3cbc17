"""train.decide_start: how a training run starts (fresh, resume, fork, overwrite) from the flags and the folder alone."""
import pytest

from lib.cli import UserError
from train import RunStart, decide_start


def test_an_empty_folder_starts_fresh_or_forks(tmp_path):
    assert decide_start(False, None, False, tmp_path / "new") == RunStart("fresh")
    assert decide_start(False, "other/finetune_epoch_1.pth", False, tmp_path) == RunStart("fork")
    (tmp_path / "train_args.json").write_text("{}")  # a run killed before its first epoch holds no checkpoint
    assert decide_start(False, None, False, tmp_path) == RunStart("fresh")


@pytest.mark.parametrize("name", ["finetune_epoch_2.pth", "last.pth"])
def test_a_folder_of_checkpoints_is_resumed_or_overwritten_never_trained_into(tmp_path, name):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(UserError, match="--resume to continue them or --overwrite"):
        decide_start(False, None, False, tmp_path)
    assert decide_start(False, None, True, tmp_path) == RunStart("fresh", overwrite=True)
    assert decide_start(False, "other/finetune_epoch_1.pth", True, tmp_path) == RunStart("fork", overwrite=True)


def test_resume_needs_last_pth_and_wins_over_fork_and_overwrite(tmp_path):
    (tmp_path / "finetune_epoch_2.pth").write_bytes(b"x")
    with pytest.raises(UserError, match="no .*last.pth to resume from"):
        decide_start(True, None, False, tmp_path)
    (tmp_path / "last.pth").write_bytes(b"x")
    assert decide_start(True, "other/finetune_epoch_1.pth", True, tmp_path) == RunStart("resume")
