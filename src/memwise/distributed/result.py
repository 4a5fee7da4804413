"""Results of distributed runs: rank 0's single-process fields plus every rank's memory."""

import dataclasses
from typing import Any

from memwise.core.serialize import from_dict, to_dict
from memwise.measure.profile import Profile
from memwise.train.runner import TrainResult


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankMemory:
    """One rank's measured (or estimated) memory.

    Attributes:
        rank: the global rank.
        peak_bytes: the most bytes live at once on this rank over the measured steps (allocator
            events; parameters, optimizer state and DDP's gradient buckets included).
        by_category: bytes by category at that peak (see memwise.measure.memory_log).
        step_ms: median wall time of a measured step (None for an estimate).
        state_bytes: bytes of this rank's parameters (its shards under FSDP2) and optimizer state
            between steps, counted from the real storages (None for an estimate).
    """

    rank: int
    peak_bytes: int
    by_category: dict[str, int]
    step_ms: float | None
    state_bytes: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerRankFields:
    """What a distributed result adds to rank 0's single-process fields.

    Attributes:
        nproc: the number of ranks (the world size).
        strategy: `ddp` or `fsdp`.
        ranks: per rank, its measured memory (by rank).
        per_rank_peak_bytes: the peaks of `ranks`, by rank.
    """

    nproc: int
    strategy: str
    ranks: tuple[RankMemory, ...]
    per_rank_peak_bytes: tuple[int, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedTrainResult(TrainResult, PerRankFields):
    """A `TrainResult` for rank 0 (loss averaged over the ranks), plus every rank's memory (`PerRankFields`)."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistributedTrainResult":
        return from_dict(cls, data, where="distributed train result")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedProfile(Profile, PerRankFields):
    """A `Profile` of rank 0 (what `memwise profile` gives for one process), plus every rank's
    memory (`PerRankFields`).

    `batch_size` and `recipe` are the global ones (each rank runs `batch_size / nproc` samples);
    `steps` counts the measured optimizer steps. The measured region also holds the wrap (DDP's
    gradient buckets, FSDP2's shards), as in a distributed training run.
    """
