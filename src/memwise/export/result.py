"""`ExportTarget` and `ExportResult`: where a model was exported to and how well it matches eager."""

import dataclasses
import enum
from typing import Any

from memwise.core.serialize import from_dict, to_dict


class ExportTarget(str, enum.Enum):
    """Export formats: ONNX (run by onnxruntime), torch.export's ExportedProgram (`.pt2`), and
    TorchScript (deprecated upstream; kept working, prefer `torch-export` or `onnx`)."""

    ONNX = "onnx"
    TORCH_EXPORT = "torch-export"
    TORCHSCRIPT = "torchscript"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportCheck:
    """One comparison of the exported artifact with eager PyTorch.

    Attributes:
        inputs: `random` (random tensors shaped like a batch) or `real` (the workload's batch).
        batch_size: samples in the batch.
        max_abs_diff: the largest absolute difference over every output element.
    """

    inputs: str
    batch_size: int
    max_abs_diff: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportResult:
    """An exported model file, verified against eager PyTorch in the same run.

    Attributes:
        path: the written file.
        target: the format, see `ExportTarget`.
        size_bytes: the file's size on disk.
        max_abs_diff: the largest absolute difference between exported and eager outputs over
            every check.
        batch_sizes_checked: batch sizes the artifact was run at (dynamic batch: 1 and 7).
        latency_ms: median forward latency of `eager` PyTorch and the `exported` artifact on the
            largest checked real batch, measured alternately in this run (CPU wall time).
        dynamic_batch: whether the batch axis was exported as dynamic.
        opset: the ONNX opset (None for other targets).
        tolerance: the largest `max_abs_diff` that counts as a pass.
        passed: `max_abs_diff <= tolerance`.
        checks: every comparison made.
        model: the workload or model class exported.
        notes: what the user should know (deprecation, compression found).
        torch_version: the torch that exported and ran it.
    """

    path: str
    target: ExportTarget
    size_bytes: int
    max_abs_diff: float
    batch_sizes_checked: tuple[int, ...]
    latency_ms: dict[str, float]
    dynamic_batch: bool
    opset: int | None
    tolerance: float
    passed: bool
    checks: tuple[ExportCheck, ...]
    model: str
    notes: tuple[str, ...] = ()
    torch_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExportResult":
        return from_dict(cls, data, where="export result")
