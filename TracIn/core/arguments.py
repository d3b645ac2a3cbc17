"""The two stages' arguments: each validates itself and gives the key that its outputs are stored under.

    factor_args = FactorArguments(layers=("fc",))                # stage 1: what the cached factors depend on
    score_args = ScoreArguments(score_fn="tracin", normalize="train")  # stage 2: how cached factors become scores
    factor_args.key(projected)   # part of the factor cache's folder name and of the run identity
    score_args.key()             # part of the run identity (empty for plain TracIn, so TracIn runs keep theirs)

TracInConfig holds one job's settings flat, as efficient_tracin's flags name them and as run.json records them, and
checks them; it builds the two stage objects, and the library (factors.py, scores.py) takes those, never the command
line. A job from Python, without argv:

    from TracIn.core.arguments import TracInConfig
    from TracIn.core.job import tracin_job
    summary = tracin_job(TracInConfig(data_dir="data/processed", output_dir="TracIn/results", top_k=20))
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from lib.cli import UserError
from TracIn.core.methods import DAMPING, NORMALIZABLE, SCORE_FNS, TRAK_DIM, method_for  # the registry's methods
from TracIn.core.methods import DEFAULT_SCORE_FN as SCORE_FN

NORMALIZE = ("none", "train", "both")


@dataclass(frozen=True)
class FactorArguments:
    """Stage 1. layers: target nn.Linear / nn.Conv2d names (blocks already expanded); proj_dim R: conv gradients
    projected to R x R per layer (0: exact); proj_seed; project_linear: linear layers projected too; amp: bf16 autocast
    on CUDA; batch_size: images per forward batch (the batches, hence the bits, depend on it)."""

    layers: tuple[str, ...] = ("fc",)
    proj_dim: int = 16
    proj_seed: int = 0
    project_linear: bool = False
    amp: bool = False
    batch_size: int = 32

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise UserError("--layers needs at least one layer name")
        if self.proj_dim < 0:
            raise UserError("--proj_dim must be >= 0 (0: no projection, the exact per-example gradient)")
        if self.batch_size < 1:
            raise UserError("--batch_size must be >= 1")

    def key(self, projected: bool) -> dict:
        """What the cached factors depend on besides the checkpoint and the images. Projection settings count only
        when some layer is projected, so exact (linear-only) caches keep their key."""
        key = {"layers": list(self.layers), "amp": bool(self.amp)}
        if projected:
            key.update(proj_dim=self.proj_dim, proj_seed=self.proj_seed, project_linear=self.project_linear)
        return key


@dataclass(frozen=True)
class ScoreArguments:
    """Stage 2. score_fn: one of methods.SCORE_FNS; normalize (methods.NORMALIZABLE only): none | train | both; damping (influence, trak) x the mean curvature; trak_dim: TRAK features per checkpoint; top_k kept per test
    image; self_influence: also TracIn's self-influence; test_block x train_block: the score blocks."""

    score_fn: str = SCORE_FN
    normalize: str = "none"
    damping: float = DAMPING
    trak_dim: int = TRAK_DIM
    top_k: int = 100
    self_influence: bool = True
    test_block: int = 1024
    train_block: int = 8192

    def __post_init__(self):
        if self.score_fn not in SCORE_FNS:
            raise UserError(f"--score_fn {self.score_fn!r}: choose one of {', '.join(SCORE_FNS)}")
        if self.normalize not in NORMALIZE:
            raise UserError(f"--normalize {self.normalize!r}: choose one of {', '.join(NORMALIZE)}")
        if self.normalize != "none" and not self.method().plain_gradients:
            raise UserError(f"--normalize {self.normalize} is for --score_fn {'/'.join(NORMALIZABLE)}; {self.score_fn} has "
                            "its own scale")
        if not (np.isfinite(self.damping) and self.damping > 0) or self.trak_dim < 1:
            raise UserError("--damping must be a positive number and --trak_dim >= 1")
        if self.top_k < 1:
            raise UserError("--top_k must be >= 1")
        if self.test_block < 1 or self.train_block < 1:
            raise UserError("--test_block and --train_block must be >= 1")

    def method(self):
        """The registry's method (methods.Method) these arguments score with."""
        return method_for(self.score_fn, self.normalize)

    def key(self) -> dict:
        """What --score_fn adds to a run's identity (nothing for plain TracIn, so TracIn runs keep theirs)."""
        return self.method().key(self.damping, self.trak_dim)


def pick(cls, settings) -> object:
    """An argument object from a flat record (a TracInConfig, a namespace or run.json's "args"), older records
    taking the defaults of fields they lack."""
    values = settings if isinstance(settings, dict) else vars(settings)
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values and values[f.name] not in (None, "")})


@dataclass
class TracInConfig:
    """Validated settings of one TracIn run; each check names the flag to fix."""

    data_dir: str = "data/processed"
    checkpoint_dir: str = "models/checkpoints"
    output_dir: str = "TracIn/results"
    checkpoints: list[str] = field(default_factory=list)
    all_checkpoints: bool = False                             # every checkpoint, not the trajectory up to the selected model
    members: list[str] = field(default_factory=list)         # checkpoint folders of an ensemble's training runs
    member_sizes: list[int] = field(default_factory=list)    # checkpoints per member, as a run.json records them
    lr_weights: list[float] = field(default_factory=list)
    layers: list[str] = field(default_factory=lambda: ["fc"])
    top_k: int = 100
    batch_size: int = 32
    train_subset: int = 0
    test_subset: int = 0
    seed: int = 0
    test_block: int = 1024
    train_block: int = 8192
    device: str = "auto"
    num_workers: int = 2
    self_influence: bool = True
    overwrite: bool = False
    shard_index: int = 0
    num_shards: int = 1
    merge: bool = False
    amp: bool = False
    normalize: str = ""
    score_fn: str = SCORE_FN
    damping: float = DAMPING
    trak_dim: int = TRAK_DIM
    cache_dir: str = ""
    proj_dim: int = 16
    proj_seed: int = 0
    project_linear: bool = False

    def __post_init__(self):
        if not self.normalize:  # TracIn's lists are normalised by default; the curvature-aware scores are not
            self.normalize = method_for(self.score_fn).default_normalize if self.score_fn in SCORE_FNS else "none"
        self.factor_args()  # each stage's arguments check themselves
        self.score_args()
        if self.members and (self.checkpoints or self.lr_weights):
            raise UserError("--members takes each member's checkpoint folder; --checkpoints and --lr_weights name one run's "
                            "files: pass one or the other")
        if len(set(map(str, self.members))) != len(self.members):
            raise UserError("--members lists a folder twice; each member is one training run")
        if self.train_subset < 0 or self.test_subset < 0:
            raise UserError("--train_subset/--test_subset must be >= 0 (0 means the whole split)")
        if any(not np.isfinite(w) or w <= 0 for w in self.lr_weights):
            raise UserError("--lr_weights must be positive numbers")
        if self.cache_dir and self.num_shards > 1:
            raise UserError("--cache_dir is for unsharded runs; each shard keeps its factors in its own folder")
        if self.num_shards > 1 and not self.score_args().method().plain_gradients:
            raise UserError(f"--score_fn {self.score_fn} needs the whole training set's curvature, which one shard does not "
                            f"have; shard with --score_fn {' or '.join(NORMALIZABLE)}, or run unsharded")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise UserError(f"--shard_index must be in [0, --num_shards) (got {self.shard_index} of {self.num_shards})")

    def factor_args(self) -> FactorArguments:
        return pick(FactorArguments, self)

    def score_args(self) -> ScoreArguments:
        return pick(ScoreArguments, self)
