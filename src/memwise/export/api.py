"""`export`: write a model as ONNX, torch.export or TorchScript and prove it matches eager PyTorch."""

import contextlib
import inspect
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError, MemwiseError
from memwise.export import onnx as onnx_target
from memwise.export import torch_export as torch_export_target
from memwise.export import torchscript as torchscript_target
from memwise.export.inputs import ModelInputs, flat_outputs, source_for
from memwise.export.operators import blamed_operator, error_summary, operator_census
from memwise.export.result import ExportCheck, ExportResult, ExportTarget

TARGETS: dict[ExportTarget, ModuleType] = {
    ExportTarget.ONNX: onnx_target,
    ExportTarget.TORCH_EXPORT: torch_export_target,
    ExportTarget.TORCHSCRIPT: torchscript_target,
}
# Batch sizes a dynamic export is checked at: 1 (exporters like to specialize it) and an odd size
# that the tracing batch (2) does not divide.
CHECK_BATCH_SIZES = (1, 7)
TRACE_BATCH_SIZE = 2
DEFAULT_TOLERANCE = 1e-4


class ExportError(MemwiseError):
    """The exporter cannot hold the model; the message names the operator, its module and a target that can."""


def export(
    model_or_workload: Any,
    to: ExportTarget | str = ExportTarget.ONNX,
    path: str | os.PathLike[str] = "model.onnx",
    *,
    dynamic_batch: bool = True,
    example_inputs: Any = None,
    opset: int | None = None,
    force: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> ExportResult:
    """Exports a model, then runs the artifact against eager PyTorch and reports how well it matches.

    The artifact is checked on random inputs and on the workload's real batches (or `example_inputs`
    repeated to the batch size), at batch sizes 1 and 7 with a dynamic batch axis, or at the traced
    batch size with `dynamic_batch=False`. Latency of eager and exported is measured alternately in
    the same run on the largest checked batch.

    Args:
        model_or_workload: a `memwise.Workload`, or an `nn.Module` with `example_inputs`.
        to: `onnx`, `torch-export` or `torchscript` (deprecated upstream).
        path: the file to write; an existing file is refused unless `force=True`.
        dynamic_batch: keep dim 0 of every input dynamic (False: fixed at batch size 1).
        example_inputs: a tensor, tuple or dict of tensors the model takes (bare models only).
        opset: ONNX opset version (ONNX only; default 18).
        force: overwrite `path` if it exists.
        tolerance: the largest max absolute difference that counts as `passed`.
        seed: seeds the random inputs.

    Returns:
        An `ExportResult` (sizes in bytes, latencies in ms).

    Raises:
        BadInputError: bad arguments, an existing path without `force`, a missing exporter package.
        ExportError: the target cannot hold the model: names the operator, the module running it,
            and a target that can hold it when one of the others can.

    Assumptions:
        The model is run in eval mode without gradients; its training flag is restored afterwards.
    """
    target = _target(to)
    path = _output_path(path, force)
    if opset is not None and target is not ExportTarget.ONNX:
        raise BadInputError(f"opset: only applies to --to onnx, got opset={opset} with --to {target.value}")
    if opset is not None:
        positive_int(opset, "opset")
    if not isinstance(dynamic_batch, bool):
        raise BadInputError(f"dynamic_batch: expected true or false, got {dynamic_batch!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise BadInputError(f"tolerance: expected a non-negative number, got {tolerance!r}")
    model, source, name = source_for(model_or_workload, example_inputs)
    notes: list[str] = []
    with _eval(model), _without_kv_cache(model, notes):
        trace_inputs = source.real(TRACE_BATCH_SIZE if dynamic_batch else 1)
        model = _tensor_outputs(model, source, trace_inputs, notes)
        dynamic_shapes = _batch_dynamic_shapes(trace_inputs) if dynamic_batch and target is not ExportTarget.TORCHSCRIPT else None
        _write(target, model, trace_inputs, path, dynamic_shapes, opset)
        run_exported = TARGETS[target].load(path, model)
        batch_sizes = CHECK_BATCH_SIZES if dynamic_batch else (1,)
        checks, timing_inputs = _compare(model, run_exported, source, batch_sizes, seed, target)
        latency_ms = _latency(model, run_exported, timing_inputs)
    size_bytes = path.stat().st_size
    max_abs_diff = max(check.max_abs_diff for check in checks)
    if target is ExportTarget.TORCHSCRIPT:
        notes.append(torchscript_target.DEPRECATION_NOTE)
    return ExportResult(
        path=str(path), target=target, size_bytes=size_bytes, max_abs_diff=max_abs_diff,
        batch_sizes_checked=tuple(batch_sizes), latency_ms=latency_ms, dynamic_batch=dynamic_batch,
        opset=(opset or onnx_target.DEFAULT_OPSET) if target is ExportTarget.ONNX else None,
        tolerance=float(tolerance), passed=max_abs_diff <= tolerance, checks=tuple(checks), model=name,
        notes=tuple(notes), torch_version=torch.__version__,
    )


def _target(to: Any) -> ExportTarget:
    try:
        return ExportTarget(to)
    except ValueError:
        raise BadInputError(f"to: invalid target {to!r}; valid targets are {', '.join(t.value for t in ExportTarget)}") from None


def _output_path(path: Any, force: bool) -> Path:
    try:
        path = Path(path)
    except TypeError:
        raise BadInputError(f"path: expected a file path, got {path!r}") from None
    if path.is_dir():
        raise BadInputError(f"path: {path} is a directory; give a file name such as {path / 'model.onnx'}")
    if path.exists() and not force:
        raise BadInputError(f"path: {path} already exists; pass force=True to overwrite it")
    if not path.parent.is_dir():
        raise BadInputError(f"path: the directory {path.parent} does not exist")
    return path


@contextlib.contextmanager
def _eval(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _without_kv_cache(model: torch.nn.Module, notes: list[str]) -> Iterator[None]:
    """Exports a model with `config.use_cache` (transformers decoders) without its KV cache.

    A cache object (DynamicCache) is not a tensor output that ONNX or torch.export can return, and
    inference of one forward does not need it; the setting is restored afterwards.
    """
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    notes.append("exported with config.use_cache=False: the outputs hold no KV cache (one forward, inference outputs only)")
    try:
        yield
    finally:
        config.use_cache = True


class _TensorOutputsOf(torch.nn.Module):
    """Calls `model` and returns only the tensors of its output, in pytree order (drops None, caches...)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(flat_outputs(self.model(*args, **kwargs)))


def _tensor_outputs(model: torch.nn.Module, source: Any, inputs: ModelInputs, notes: list[str]) -> torch.nn.Module:
    """`model`, or a wrapper returning only its output tensors when its output holds other objects.

    The wrapper keeps the model's forward signature, so inputs and dynamic shapes bind by name.
    """
    try:
        output = inputs.call(model)
    except Exception as error:
        shapes = [tuple(tensor.shape) for tensor in inputs.tensors()]
        raise BadInputError(
            f"{'example_inputs' if source.make_batch is None else 'workload batch'}: the model fails in eager PyTorch "
            f"on inputs of shapes {shapes} before any export "
            f"({error_summary(error)}); "
            + ("make_batch must give what the forward needs at inference (labels are dropped)" if source.make_batch is not None
               else "give inputs it runs on (CLI: --input-shape)")
        ) from error
    dropped = sorted({type(leaf).__name__ for leaf in tree_leaves(output) if leaf is not None and not isinstance(leaf, torch.Tensor)})
    if not dropped:
        return model
    wrapper_class = type(f"TensorOutputsOf{type(model).__name__}", (_TensorOutputsOf,), {})
    forward = lambda self, *args, **kwargs: _TensorOutputsOf.forward(self, *args, **kwargs)  # noqa: E731
    signature = inspect.signature(model.forward)
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(parameters=[self_parameter, *signature.parameters.values()])
    wrapper_class.forward = forward
    notes.append(f"exported the output tensors only: dropped non-tensor outputs of type {', '.join(dropped)}")
    return wrapper_class(model).eval()


def _batch_dynamic_shapes(inputs: ModelInputs) -> object:
    batch = torch.export.Dim("batch")

    def spec(tensor: torch.Tensor) -> dict[int, Any] | None:
        return {0: batch} if tensor.dim() > 0 and tensor.shape[0] == inputs.batch_size else None

    if inputs.kwargs:
        return {name: spec(tensor) for name, tensor in inputs.kwargs.items()}
    return tuple(spec(tensor) for tensor in inputs.args)


def _write(target: ExportTarget, model: torch.nn.Module, inputs: ModelInputs, path: Path, dynamic_shapes: object, opset: int | None) -> None:
    """Exports through a temporary file next to `path`, renamed on success (never half a file)."""
    # The suffix stays last: torch.export.save wants a `.pt2` name.
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        TARGETS[target].save(model, inputs, temporary, dynamic_shapes, opset)
        os.replace(temporary, path)
    except (BadInputError, KeyboardInterrupt):
        raise
    except Exception as error:
        raise _explain(error, target, model, inputs, dynamic_shapes) from error
    finally:
        temporary.unlink(missing_ok=True)


def _explain(error: Exception, target: ExportTarget, model: torch.nn.Module, inputs: ModelInputs, dynamic_shapes: object) -> ExportError:
    """Names the operator and module the exporter failed on, and a target that holds them."""
    try:
        uses = operator_census(model, inputs)
    except Exception:  # the model does not even run eagerly: the exporter's message is all there is
        uses = []
    blamed = blamed_operator(error, uses)
    what = f"{blamed.describe()}" if blamed else "the model"
    holding = []
    for other, module in TARGETS.items():
        if other is target:
            continue
        try:
            module.trial(model, inputs, dynamic_shapes if other is not ExportTarget.TORCHSCRIPT else None)
        except Exception:
            continue
        holding.append(other.value)
    hint = (f"; --to {' or --to '.join(holding)} can hold it" if holding
            else "; no other target holds it either: replace that module, or register the operator (torch.library.register_fake for torch.export/ONNX)")
    if holding == [ExportTarget.TORCHSCRIPT.value]:
        hint += " (TorchScript is deprecated upstream, but the only target that runs this eager kernel)"
    return ExportError(f"--to {target.value} cannot export {what}: {error_summary(error)}{hint}")


def _compare(
    model: torch.nn.Module, run_exported: Callable[[ModelInputs], list[torch.Tensor]], source: Any,
    batch_sizes: tuple[int, ...], seed: int, target: ExportTarget,
) -> tuple[list[ExportCheck], ModelInputs]:
    generator = torch.Generator().manual_seed(seed)
    checks = []
    real = None
    for batch_size in batch_sizes:
        real = source.real(batch_size)
        for kind, inputs in (("random", real.randomized(generator)), ("real", real)):
            expected = flat_outputs(inputs.call(model))
            try:
                actual = run_exported(inputs)
            except Exception as error:
                raise ExportError(
                    f"the {target.value} artifact fails on a {kind} batch of {batch_size} "
                    f"({error_summary(error)}); if the batch axis is the problem, export with --static-batch"
                ) from error
            checks.append(ExportCheck(inputs=kind, batch_size=batch_size, max_abs_diff=_max_abs_diff(expected, actual, kind, batch_size)))
    return checks, real


def _max_abs_diff(expected: list[torch.Tensor], actual: list[torch.Tensor], kind: str, batch_size: int) -> float:
    if len(expected) != len(actual):
        raise ExportError(f"exported model returns {len(actual)} outputs, eager {len(expected)} (on {kind} inputs, batch {batch_size})")
    worst = 0.0
    for index, (want, got) in enumerate(zip(expected, actual)):
        if tuple(want.shape) != tuple(got.shape):
            raise ExportError(
                f"output {index}: exported shape {tuple(got.shape)} differs from eager {tuple(want.shape)} "
                f"(on {kind} inputs, batch {batch_size}); was the batch axis frozen?"
            )
        if want.numel():
            difference = (want.detach().double().cpu() - got.detach().double().cpu()).abs().max().item()
            worst = max(worst, difference)
    return worst


def _latency(model: torch.nn.Module, run_exported: Callable[[ModelInputs], list[torch.Tensor]], inputs: ModelInputs,
             *, budget_s: float = 1.0, max_repeats: int = 30) -> dict[str, float]:
    """Median ms per forward, eager and exported taking turns so both see the same machine state."""
    eager_ms: list[float] = []
    exported_ms: list[float] = []
    run_exported(inputs)  # warm-up (ORT allocates its arena on the first run)
    inputs.call(model)
    started = time.perf_counter()
    while len(eager_ms) < max_repeats and (len(eager_ms) < 3 or time.perf_counter() - started < budget_s):
        for runner, times in ((lambda: inputs.call(model), eager_ms), (lambda: run_exported(inputs), exported_ms)):
            start = time.perf_counter()
            runner()
            times.append((time.perf_counter() - start) * 1e3)
    return {"eager": statistics.median(eager_ms), "exported": statistics.median(exported_ms)}
