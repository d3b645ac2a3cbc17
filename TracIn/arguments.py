"""The two stages' arguments: each validates itself and gives the key that its outputs are stored under.

    factor_args = FactorArguments(layers=("fc",))                # stage 1: what the cached factors depend on
    score_args = ScoreArguments(score_fn="tracin", normalize="train")  # stage 2: how cached factors become scores
    factor_args.key(projected)   # part of the factor cache's folder name and of the run identity
    score_args.key()             # part of the run identity (empty for plain TracIn, so TracIn runs keep theirs)

efficient_tracin's command line (TracInConfig) is flat, as users type it and as run.json records it; it builds these
two objects, and the library (factors.py, scores.py) takes them, never the command line.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from common import UserError

NORMALIZE = ("none", "train", "both")
SCORE_FNS = ("tracin", "tracin_last", "influence", "influence_last", "trak")
SCORE_FN = "influence_last"  # the default: the best LDS, head and full retraining, on both data sets (docs/lds.md)
DAMPING = 10.0  # x the mean curvature: within 0.035 of each cell's best LDS on its held-apart subsets (docs/lds.md)


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
    """Stage 2. score_fn: tracin | tracin_last | influence | influence_last | trak; normalize (tracin only): none | train |
    both; damping (influence, trak) x the mean curvature; trak_dim: TRAK features per checkpoint; top_k kept per test
    image; self_influence: also TracIn's self-influence; test_block x train_block: the score blocks."""

    score_fn: str = SCORE_FN
    normalize: str = "none"
    damping: float = DAMPING
    trak_dim: int = 2048
    top_k: int = 100
    self_influence: bool = True
    test_block: int = 1024
    train_block: int = 8192

    def __post_init__(self):
        if self.score_fn not in SCORE_FNS:
            raise UserError(f"--score_fn {self.score_fn!r}: choose one of {', '.join(SCORE_FNS)}")
        if self.normalize not in NORMALIZE:
            raise UserError(f"--normalize {self.normalize!r}: choose one of {', '.join(NORMALIZE)}")
        if self.normalize != "none" and not self.score_fn.startswith("tracin"):
            raise UserError(f"--normalize {self.normalize} is for --score_fn tracin/tracin_last; {self.score_fn} has its own scale")
        if not (np.isfinite(self.damping) and self.damping > 0) or self.trak_dim < 1:
            raise UserError("--damping must be a positive number and --trak_dim >= 1")
        if self.top_k < 1:
            raise UserError("--top_k must be >= 1")
        if self.test_block < 1 or self.train_block < 1:
            raise UserError("--test_block and --train_block must be >= 1")

    @property
    def last_only(self) -> bool:
        return self.score_fn in ("tracin_last", "influence_last")

    def key(self) -> dict:
        """What --score_fn adds to a run's identity (nothing for plain TracIn, so TracIn runs keep theirs)."""
        if self.score_fn == "tracin":
            return {}
        extra = {"trak_dim": self.trak_dim} if self.score_fn == "trak" else {}
        return {"score_fn": self.score_fn, **({} if self.score_fn == "tracin_last" else {"damping": self.damping}), **extra}


def pick(cls, settings) -> object:
    """An argument object from a flat record (a TracInConfig, a namespace or run.json's "args"), older records
    taking the defaults of fields they lack."""
    values = settings if isinstance(settings, dict) else vars(settings)
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values and values[f.name] not in (None, "")})
