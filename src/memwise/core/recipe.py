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


# The settings of the built-in optimizers (torch's defaults for the rest), and how --help names them.
OPTIMIZER_SETTINGS: dict[OptimizerName, dict[str, float]] = {
    OptimizerName.SGD: {"lr": 1e-3, "momentum": 0.9},
    OptimizerName.ADAM: {"lr": 1e-3},
    OptimizerName.ADAMW: {"lr": 1e-3},
}
OPTIMIZER_DESCRIPTIONS: dict[OptimizerName, str] = {
    OptimizerName.SGD: "SGD with momentum 0.9, lr 1e-3",
    OptimizerName.ADAM: "Adam, lr 1e-3, betas (0.9, 0.999), no weight decay",
    OptimizerName.ADAMW: "AdamW, lr 1e-3, betas (0.9, 0.999), weight decay 0.01",
}


class OptimizerImpl(str, enum.Enum):
    """Which kernel family runs a built-in optimizer's update (unset: torch's default).

    `foreach`: multi-tensor kernels over all parameters at once (fast; temporaries as large as the
    parameters); `fused`: one fused kernel per parameter group (fastest, fewest temporaries);
    `for-loop`: one parameter at a time (slowest, smallest temporaries).
    """

    FOREACH = "foreach"
    FUSED = "fused"
    FOR_LOOP = "for-loop"


class Mode(str, enum.Enum):
    """What a step does: `train` (forward, loss, backward, optimizer) or `infer` (forward only)."""

    TRAIN = "train"
    INFER = "infer"
    GENERATE = "generate"  # LLM generation (prefill + decoding): memwise.estimate.generate, not a Recipe step


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
        optimizer_impl: see `OptimizerImpl`; None keeps torch's default (foreach on CUDA, for-loop
            on CPU). Applies to torch's built-in optimizers only.
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
    optimizer_impl: OptimizerImpl | None = None
    offload: OffloadMode = OffloadMode.NONE
    allocator: str = ""
    zero_grad_set_to_none: bool = True
    sdpa_backend: SdpaBackend = SdpaBackend.AUTO

    # derived values written to JSON and checked on reading (see core/serialize.py)
    json_derived = ("grad_accumulation_steps",)

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
        for name, enum_type in (("optimizer", OptimizerName), ("optimizer_impl", OptimizerImpl)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _coerce_enum(enum_type, getattr(self, name), name))
        if self.optimizer_impl is not None and self.optimizer_state != OptimizerStateDtype.FP32:
            raise BadInputError(
                f"optimizer_impl: {self.optimizer_impl.value!r} applies to torch's built-in optimizers, but "
                f"optimizer_state={self.optimizer_state.value} runs memwise's own low-precision Adam; leave optimizer_impl unset"
            )
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
        """The fields as JSON, plus the derived `grad_accumulation_steps`."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """Builds a Recipe; a `grad_accumulation_steps` key must agree with batch_size / micro_batch_size."""
        return from_dict(cls, data, where="recipe")
