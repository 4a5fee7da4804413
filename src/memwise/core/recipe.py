"""`Recipe`: how one step is run (batch size, precision, checkpointing, optimizer).

Every field is a str enum defined once here, shared by the library, the JSON files and the CLI.
"""

import dataclasses
import enum
from typing import Any

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError
from memwise.core.serialize import from_dict, to_dict


class Precision(str, enum.Enum):
    """Numeric precision of the step.

    `fp32`; `bf16` / `fp16` autocast (fp16 with GradScaler); `bf16-weights`: parameters stored in
    bf16, with fp32 master copies updated by the optimizer.
    """

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    BF16_WEIGHTS = "bf16-weights"


class CheckpointMode(str, enum.Enum):
    """Activation checkpointing of the model's top-level blocks.

    `none`; `full`: every block recomputes its activations in backward; `selective`: the chosen
    blocks (`checkpoint_modules`, default all) keep their matmul and attention outputs and
    recompute the cheap ops; `every_n`: every `checkpoint_every_n`-th block, fully.
    """

    NONE = "none"
    FULL = "full"
    SELECTIVE = "selective"
    EVERY_N = "every_n"


class OptimizerStateDtype(str, enum.Enum):
    """How Adam/AdamW keep their moments: fp32, bf16, or 8-bit block-quantized."""

    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "8bit"


class OffloadMode(str, enum.Enum):
    """What lives in host memory instead of on the device: optimizer state, saved activations, or both."""

    NONE = "none"
    OPTIMIZER = "optimizer"
    ACTIVATIONS = "activations"
    ALL = "all"


class SdpaBackend(str, enum.Enum):
    """The `scaled_dot_product_attention` kernel to force (`auto` lets PyTorch choose)."""

    AUTO = "auto"
    MATH = "math"
    FLASH = "flash"
    EFFICIENT = "efficient"
    CUDNN = "cudnn"


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
        batch_size: samples per optimizer step (the effective batch); None means the workload's
            `default_batch_size`.
        micro_batch_size: samples per forward/backward pass; the step accumulates gradients over
            `batch_size / micro_batch_size` passes. None means `batch_size` (no accumulation).
        precision: see `Precision`.
        checkpoint: see `CheckpointMode`.
        checkpoint_every_n: the period of `every_n` checkpointing.
        checkpoint_modules: for `selective`: block class names or qualified names to checkpoint
            (empty: every block).
        optimizer: `sgd`, `adam`, `adamw`; None means the workload's own optimizer factory,
            or AdamW(lr=1e-3) when it has none.
        optimizer_state: `fp32`, `bf16` or `8bit` moments for Adam/AdamW.
        offload: see `OffloadMode` (a no-op where the device is the host).
        allocator: CUDA caching-allocator settings in PYTORCH_CUDA_ALLOC_CONF form, e.g.
            `expandable_segments:True,max_split_size_mb:128` (reported and ignored on CPU).
        zero_grad_set_to_none: free gradients after the step instead of zeroing them.
        sdpa_backend: the attention kernel to force, see `SdpaBackend`.
    """

    batch_size: int | None = None
    micro_batch_size: int | None = None
    precision: Precision = Precision.FP32
    checkpoint: CheckpointMode = CheckpointMode.NONE
    checkpoint_every_n: int = 2
    checkpoint_modules: tuple[str, ...] = ()
    optimizer: OptimizerName | None = None
    optimizer_state: OptimizerStateDtype = OptimizerStateDtype.FP32
    offload: OffloadMode = OffloadMode.NONE
    allocator: str = ""
    zero_grad_set_to_none: bool = True
    sdpa_backend: SdpaBackend = SdpaBackend.AUTO

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch_size"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), name)
        if self.micro_batch_size is not None and self.batch_size is not None and self.batch_size % self.micro_batch_size:
            raise BadInputError(
                f"micro_batch_size: {self.micro_batch_size} must divide batch_size {self.batch_size} "
                "so every accumulation pass has the same size"
            )
        positive_int(self.checkpoint_every_n, "checkpoint_every_n")
        if isinstance(self.checkpoint_modules, str) or not all(isinstance(name, str) for name in self.checkpoint_modules):
            raise BadInputError(f"checkpoint_modules: expected a list of module names, got {self.checkpoint_modules!r}")
        object.__setattr__(self, "checkpoint_modules", tuple(self.checkpoint_modules))
        for name, enum_type in (("precision", Precision), ("checkpoint", CheckpointMode), ("optimizer_state", OptimizerStateDtype),
                                ("offload", OffloadMode), ("sdpa_backend", SdpaBackend)):
            object.__setattr__(self, name, _coerce_enum(enum_type, getattr(self, name), name))
        if self.optimizer is not None:
            object.__setattr__(self, "optimizer", _coerce_enum(OptimizerName, self.optimizer, "optimizer"))
        if not isinstance(self.zero_grad_set_to_none, bool):
            raise BadInputError(f"zero_grad_set_to_none: expected true or false, got {self.zero_grad_set_to_none!r}")
        if not isinstance(self.allocator, str):
            raise BadInputError(f"allocator: expected a string like 'expandable_segments:True', got {self.allocator!r}")

    @property
    def grad_accumulation_steps(self) -> int:
        """Forward/backward passes per optimizer step (1 without micro-batching)."""
        if self.batch_size is None or self.micro_batch_size is None:
            return 1
        return self.batch_size // self.micro_batch_size

    def replace(self, **changes: Any) -> "Recipe":
        """Returns a copy with `changes` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        return from_dict(cls, data, where="recipe")
