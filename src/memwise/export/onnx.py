"""ONNX through torch's exporter (`torch.onnx.export(dynamo=True)`, needs `onnx` and `onnxscript`),
run back with onnxruntime."""

import contextlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from memwise.core.errors import BadInputError
from memwise.export.inputs import ModelInputs

DEFAULT_OPSET = 18


def save(model: torch.nn.Module, inputs: ModelInputs, path: Path, dynamic_shapes: object, opset: int | None) -> None:
    """Exports `model` traced on `inputs` to one ONNX file at `path` (weights inside the file)."""
    _require("onnx", "onnxscript")
    with contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress on stdout
        program = torch.onnx.export(
            model, inputs.args, kwargs=inputs.kwargs, dynamic_shapes=dynamic_shapes, opset_version=opset or DEFAULT_OPSET,
            dynamo=True, verbose=False, external_data=False,
        )
        program.save(str(path), external_data=False)


def trial(model: torch.nn.Module, inputs: ModelInputs, dynamic_shapes: object) -> None:
    """Exports in memory only (raises if the model cannot be exported)."""
    _require("onnx", "onnxscript")
    with contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(model, inputs.args, kwargs=inputs.kwargs, dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False)


def load(path: Path, model: torch.nn.Module) -> Callable[[ModelInputs], list[torch.Tensor]]:
    """An onnxruntime CPU session for `path`, called like the model on `ModelInputs`."""
    _require("onnxruntime")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf classes
        raise BadInputError(f"ONNX file {path}: onnxruntime cannot load it ({type(error).__name__}: {str(error)[:300]})") from error
    names = [node.name for node in session.get_inputs()]
    signature = inspect.signature(model.forward)

    def run(inputs: ModelInputs) -> list[torch.Tensor]:
        bound = signature.bind_partial(*inputs.args, **inputs.kwargs).arguments
        if not all(name in bound for name in names):  # inputs not named after the forward's parameters: by position
            bound = dict(zip(names, inputs.tensors()))
        feeds = {name: bound[name].detach().cpu().numpy() for name in names}
        return [torch.from_numpy(array) for array in session.run(None, feeds)]

    return run


def _require(*packages: str) -> None:
    import importlib.util

    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise BadInputError(f"--to onnx needs {', '.join(missing)}: pip install 'memwise[export]'")
