"""torch.export: an `ExportedProgram` saved with `torch.export.save` (a `.pt2` archive)."""

from collections.abc import Callable
from pathlib import Path

import torch

from memwise.core.errors import BadInputError
from memwise.export.inputs import ModelInputs, flat_outputs


def trial(model: torch.nn.Module, inputs: ModelInputs, dynamic_shapes: object) -> torch.export.ExportedProgram:
    """Exports `model` traced on `inputs` (non-strict tracing, as the ONNX exporter's first try)."""
    return torch.export.export(model, inputs.args, inputs.kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def save(model: torch.nn.Module, inputs: ModelInputs, path: Path, dynamic_shapes: object, opset: int | None) -> None:
    torch.export.save(trial(model, inputs, dynamic_shapes), str(path))


def load(path: Path, model: torch.nn.Module) -> Callable[[ModelInputs], list[torch.Tensor]]:
    """The saved program's module, called on `ModelInputs`."""
    try:
        program = torch.export.load(str(path))
    except Exception as error:
        raise BadInputError(f"torch.export file {path}: cannot load it ({type(error).__name__}: {str(error)[:300]})") from error
    module = program.module()
    return lambda inputs: flat_outputs(inputs.call(module))
