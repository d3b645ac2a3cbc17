"""Per-image training dynamics recorded by train.py from its own forward passes, at no extra cost.

For every training image and epoch: the loss, the logit margin (given-label logit minus the
largest other logit; Pleiss et al. 2020, "Identifying Mislabeled Data using the Area Under the
Margin Ranking") and whether it was classified correctly, as seen by the training forward pass
(augmented input, batch norm in training mode). Saved atomically as
checkpoint_dir/training_dynamics.npz after every epoch, indexed like the manifest's train split:

    loss, margin   float32 [epochs, n_train]   NaN where an image was not seen that epoch
    correct        int8    [epochs, n_train]   1 / 0, -1 where not seen
    class_names, n_train, data_dir             what the rows mean (checked on load)
    train_run                                  the training run's id (also in each of its checkpoints)

    from lib.training_dynamics import load_dynamics
    dyn = load_dynamics("models/checkpoints", n_train=4000, class_names=[...])
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lib.cli import UserError
from lib.files import atomic_path, load_npz
from lib.training import example_figures

FILE = "training_dynamics.npz"


class DynamicsRecorder:
    """Collects one epoch's per-image figures; `rows()` gives them for an all-reduce under DDP."""

    def __init__(self, n_train: int, epochs: int, class_names: list[str], data_dir: str, previous: dict | None = None,
                 start_epoch: int = 1, train_run: str = ""):
        self.n, self.class_names, self.data_dir = n_train, list(class_names), str(Path(data_dir).resolve())
        self.train_run = train_run
        self.loss = np.full((epochs, n_train), np.nan, dtype=np.float32)
        self.margin = np.full((epochs, n_train), np.nan, dtype=np.float32)
        self.correct = np.full((epochs, n_train), -1, dtype=np.int8)
        if previous is not None:  # --resume: keep the epochs before the one that is (re)run
            keep = min(start_epoch - 1, len(previous["loss"]), epochs)
            for name in ("loss", "margin", "correct"):
                getattr(self, name)[:keep] = previous[name][:keep]
        self._sums = np.zeros((3, n_train), dtype=np.float64)  # loss, margin, correct of this epoch
        self._seen = np.zeros(n_train, dtype=np.float64)

    def record(self, idx, logits, labels) -> None:
        """idx (b,) split indices, logits (b, C) float tensor, labels (b,) of one training batch."""
        import torch

        with torch.no_grad():
            z = logits.detach().float()
            loss, margin, _ = example_figures(z, labels)
            correct = (z.argmax(1) == labels).float()
        i = idx.cpu().numpy()
        self._sums[0, i] += loss.cpu().numpy()
        self._sums[1, i] += margin.cpu().numpy()
        self._sums[2, i] += correct.cpu().numpy()
        self._seen[i] += 1

    def end_epoch(self, epoch: int, reduce=None) -> None:
        """Close 1-based `epoch`; `reduce` sums arrays over DDP ranks (each rank saw a share)."""
        sums, seen = self._sums, self._seen
        if reduce is not None:
            sums, seen = reduce(sums), reduce(seen)
        ok = seen > 0
        e = epoch - 1
        self.loss[e, ok] = sums[0, ok] / seen[ok]
        self.margin[e, ok] = sums[1, ok] / seen[ok]
        self.correct[e, ok] = (sums[2, ok] / seen[ok] >= 0.5).astype(np.int8)
        self._sums[:] = 0
        self._seen[:] = 0

    def save(self, checkpoint_dir, epochs_done: int) -> None:
        with atomic_path(Path(checkpoint_dir) / FILE) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, loss=self.loss[:epochs_done], margin=self.margin[:epochs_done], correct=self.correct[:epochs_done],
                         class_names=np.asarray(self.class_names), n_train=np.int64(self.n), data_dir=np.asarray(self.data_dir),
                         train_run=np.asarray(self.train_run))


def load_dynamics(checkpoint_dir, n_train: int, class_names: list[str], required: bool = False,
                  train_runs: list | None = None, fix: str | None = None) -> dict | None:
    """The dynamics file of `checkpoint_dir`, checked against the data it will be indexed with.

    Returns None when there is no file (and not required); raises UserError for a file of
    another data set (other n or class list), naming the flag to fix, and, given `train_runs` (the run ids of the
    checkpoints a TracIn run used), for the dynamics of another training run. fix: what the user should do instead of
    the default advice (pass another --checkpoint_dir), for callers where that flag does not choose the folder.
    """
    path = Path(checkpoint_dir) / FILE
    if not path.exists():
        if required:
            raise UserError(f"no {path}: train.py writes it; {fix or 'pass the --checkpoint_dir of the training run'}")
        return None
    dyn = load_npz(path, ("class_names", "n_train"), f"train.py writes it: {fix or 'retrain, or pass the --checkpoint_dir of an intact run'}")
    names = [str(c) for c in dyn["class_names"]]
    if int(dyn["n_train"]) != n_train or names != list(class_names):
        raise UserError(f"{path} belongs to another data set ({int(dyn['n_train'])} training images, classes {names}; "
                        f"this data has {n_train}, {list(class_names)}); {fix or 'pass the matching --checkpoint_dir or --data_dir'}")
    if train_runs is not None:
        mine = str(dyn["train_run"]) if "train_run" in dyn else ""
        if not mine or any(r != mine for r in train_runs):
            raise UserError(f"{path} was recorded by training run {mine or '(unknown)'}, but the TracIn results come from the "
                            f"checkpoints of run {', '.join(sorted({str(r) for r in train_runs}))}; "
                            f"{fix or 'pass the --checkpoint_dir of the training run whose checkpoints TracIn used'}")
    return dyn


def dynamics_of_run(record: dict, checkpoint_dir, n_train: int, class_names: list[str]) -> list[dict]:
    """The training dynamics behind a TracIn run (its run.json `record`): checkpoint_dir's for one training run
    ([] when it has none; None: models/checkpoints); for an ensemble (efficient_tracin --members) every member's, read
    from the folder of its recorded checkpoints, each checked to be that member's run (a checkpoint_dir given there
    must be one of the members' folders)."""
    ckpts = record["checkpoints"]
    sizes = record["args"].get("member_sizes") or [len(ckpts)]
    if len(sizes) == 1:
        one = load_dynamics(checkpoint_dir or "models/checkpoints", n_train, class_names,
                            train_runs=[c.get("train_run") for c in ckpts])
        return [] if one is None else [one]
    bounds = np.cumsum([0] + list(sizes))
    groups = [ckpts[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    folders = [Path(g[0]["path"]).parent for g in groups]
    if checkpoint_dir is not None and Path(checkpoint_dir).resolve() not in {f.resolve() for f in folders}:
        raise UserError(f"--checkpoint_dir {checkpoint_dir} is not a member of this ensemble ({', '.join(map(str, folders))}); "
                        "each member's training dynamics come from its own folder: drop --checkpoint_dir")
    members = " ".join(map(str, folders))
    return [load_dynamics(folder, n_train, class_names, required=True, train_runs=[c.get("train_run") for c in g],
                          fix=f"a member's folder must hold the run the ensemble's TracIn run scored (retrained since?): "
                              f"rerun python -m TracIn.efficient_tracin --members {members}")
            for folder, g in zip(folders, groups)]
