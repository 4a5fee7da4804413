"""What a distributed run is: the strategy, the workload spec and the recipe every rank runs."""

import dataclasses
import enum
from typing import Any

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe
from memwise.core.serialize import from_dict, to_dict


class DistStrategy(str, enum.Enum):
    """How ranks share the model: `ddp` (a full replica per rank, gradients all-reduced) or `fsdp`
    (FSDP2 `fully_shard`: parameters, gradients and optimizer state sharded over the ranks)."""

    DDP = "ddp"
    FSDP = "fsdp"


def coerce_strategy(value: Any) -> DistStrategy:
    """`value` as a DistStrategy, or a BadInputError naming the valid ones."""
    try:
        return DistStrategy(value)
    except ValueError:
        raise BadInputError(f"strategy: invalid value {value!r}; valid values are ddp, fsdp") from None


# Precisions the ranks can train with: bf16-weights' bf16 parameters and fp32 masters are made by
# patching the model after DDP/FSDP2 have wrapped it, which leaves FSDP2's gathered weights fp32.
DISTRIBUTED_PRECISIONS = ("fp32", "bf16", "fp16")


def check_distributed_precision(recipe: Recipe) -> None:
    """A BadInputError when `recipe.precision` is one distributed ranks cannot train with."""
    if recipe.precision.value not in DISTRIBUTED_PRECISIONS:
        raise BadInputError(f"--precision: {recipe.precision.value!r} is not supported with --nproc/--strategy; "
                            f"supported precisions are {', '.join(DISTRIBUTED_PRECISIONS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedTrainConfig:
    """Everything a rank needs to run its part of `memwise train --nproc N --strategy S`.

    Attributes:
        spec: the workload spec (built-in name, file.py:function or module:function).
        args: keyword arguments of the workload function.
        recipe: the recipe; `batch_size` is the global batch, split evenly over the ranks.
        steps: optimizer steps to run.
        strategy: see `DistStrategy`.
        device: `cpu` (gloo) or `cuda` (nccl, one GPU per local rank).
        checkpoint_dir: where each rank keeps `memwise-train-rank<r>.pt` (atomically replaced), or None.
        checkpoint_every: write the checkpoints every K steps and at the end.
        measure_steps: the first steps measured with the allocator profiler (the rest run untracked).
        result_path: where rank 0 writes the run's JSON (atomically), or None.
        task: `train` (a `DistributedTrainResult`) or `profile` (every step measured, no
            checkpoints, a `DistributedProfile`).
    """

    spec: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe: Recipe = dataclasses.field(default_factory=Recipe)
    steps: int = 10
    strategy: DistStrategy = DistStrategy.DDP
    device: str = "cpu"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 10
    measure_steps: int = 3
    result_path: str | None = None
    task: str = "train"

    def __post_init__(self) -> None:
        positive_int(self.steps, "steps")
        positive_int(self.checkpoint_every, "checkpoint_every")
        positive_int(self.measure_steps, "measure_steps")
        object.__setattr__(self, "strategy", coerce_strategy(self.strategy))
        if self.device not in ("cpu", "cuda"):
            raise BadInputError(f"device: invalid value {self.device!r}; valid values are cpu, cuda")
        if self.task not in ("train", "profile"):
            raise BadInputError(f"task: invalid value {self.task!r}; valid values are train, profile")
        check_distributed_precision(self.recipe)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistributedTrainConfig":
        return from_dict(cls, data, where="distributed train config")
