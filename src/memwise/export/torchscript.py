"""TorchScript by tracing (`torch.jit.trace`). Deprecated upstream: prefer torch.export or ONNX.

Kept because it is the one target that holds eager-only kernels, such as torch.ao's dynamically
quantized `quantized::linear_dynamic`, whose packed weights torch.export cannot flatten.
"""

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from memwise.core.errors import BadInputError
from memwise.export.inputs import ModelInputs, flat_outputs

DEPRECATION_NOTE = "TorchScript is deprecated upstream (no new features); prefer --to torch-export or --to onnx"


def trial(model: torch.nn.Module, inputs: ModelInputs, dynamic_shapes: object) -> torch.jit.ScriptModule:
    """Traces `model` on `inputs` (dict and tuple outputs allowed: `strict=False`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values recorded as constants
        if inputs.kwargs:
            return torch.jit.trace(model, example_kwarg_inputs=inputs.kwargs, strict=False, check_trace=False)
        return torch.jit.trace(model, inputs.args, strict=False, check_trace=False)


def save(model: torch.nn.Module, inputs: ModelInputs, path: Path, dynamic_shapes: object, opset: int | None) -> None:
    scripted = trial(model, inputs, dynamic_shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # memwise states the deprecation once, in the result
        torch.jit.save(scripted, str(path))


def load(path: Path, model: torch.nn.Module) -> Callable[[ModelInputs], list[torch.Tensor]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path))
    except Exception as error:
        raise BadInputError(f"TorchScript file {path}: cannot load it ({type(error).__name__}: {str(error)[:300]})") from error
    return lambda inputs: flat_outputs(inputs.call(module))
