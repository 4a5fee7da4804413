"""`Recipe`: how one step is run (batch size, precision, checkpointing, optimizer).

Every field is a str enum defined once here, shared by the library, the JSON files and the CLI.
"""

import dataclasses
import enum
from typing import Any

from memwise.core.errors import BadInputError
from memwise.core.serialize import from_dict, to_dict


class Precision(str, enum.Enum):
    """Numeric precision of the step: fp32, or autocast to bf16 / fp16 (fp16 with GradScaler)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class CheckpointMode(str, enum.Enum):
    """Activation checkpointing: none, or `full` = every top-level block recomputed in backward."""

    NONE = "none"
    FULL = "full"


class OptimizerName(str, enum.Enum):
    """Built-in optimizers a recipe can ask for."""

    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class Mode(str, enum.Enum):
    """What a step does: `train` (forward, loss, backward, optimizer) or `infer` (forward only)."""

    TRAIN = "train"
    INFER = "infer"


def _coerce_enum(enum_type: type[enum.Enum], value: Any, name: str) -> Any:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        valid = ", ".join(member.value for member in enum_type)
        raise BadInputError(f"{name}: invalid value {value!r}; valid values are {valid}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a step is run. Frozen; round-trips through JSON with `to_dict`/`from_dict`.

    Attributes:
        batch_size: samples per step; None means the workload's `default_batch_size`.
        precision: `fp32`, `bf16` (autocast) or `fp16` (autocast with GradScaler).
        checkpoint: `none`, or `full` (every top-level block is recomputed in backward).
        optimizer: `sgd`, `adam`, `adamw`; None means the workload's own optimizer factory,
            or AdamW(lr=1e-3) when it has none.
    """

    batch_size: int | None = None
    precision: Precision = Precision.FP32
    checkpoint: CheckpointMode = CheckpointMode.NONE
    optimizer: OptimizerName | None = None

    def __post_init__(self) -> None:
        if self.batch_size is not None:
            if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
                raise BadInputError(f"batch_size: must be a positive integer, got {self.batch_size!r}")
        object.__setattr__(self, "precision", _coerce_enum(Precision, self.precision, "precision"))
        object.__setattr__(self, "checkpoint", _coerce_enum(CheckpointMode, self.checkpoint, "checkpoint"))
        if self.optimizer is not None:
            object.__setattr__(self, "optimizer", _coerce_enum(OptimizerName, self.optimizer, "optimizer"))

    def replace(self, **changes: Any) -> "Recipe":
        """Returns a copy with `changes` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        return from_dict(cls, data, where="recipe")
