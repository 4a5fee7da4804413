"""`run_in_budget`: inference of a workload with its weights offloaded to fit a budget, measured."""

import dataclasses
import statistics
import time
from typing import Any

import torch

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError
from memwise.core.serialize import from_dict, to_dict
from memwise.core.workload import Workload
from memwise.export.inputs import flat_outputs, inference_inputs
from memwise.export.offload import offload
from memwise.measure.tracker import persistent_tensors, record_steps


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunResult:
    """One inference batch run with offloaded weights, measured on this machine.

    Attributes:
        peak_bytes: the most bytes live in compute memory during the offloaded forward (resident
            weights, streamed weights, activations), from the allocator's events.
        resident_weight_bytes_max: the most parameter bytes resident at once.
        budget_bytes: the budget the weights were held to.
        weight_bytes: all of the model's parameter bytes.
        latency_ms: median wall time of an offloaded forward.
        plain_latency_ms: median wall time of the same forward with every weight resident (None
            when the plain model does not fit the compute device).
        max_abs_diff: the largest absolute difference to the plain model's output (None when the
            plain model does not fit the compute device).
        where: `disk` or `cpu`.
        device: the compute device.
        pinned_units: the blocks and modules kept resident; the rest were streamed.
        workload: the workload's name.
        batch_size: samples in the batch.
    """

    peak_bytes: int
    resident_weight_bytes_max: int
    budget_bytes: int
    weight_bytes: int
    latency_ms: float
    plain_latency_ms: float | None
    max_abs_diff: float | None
    where: str
    device: str
    pinned_units: tuple[str, ...]
    workload: str
    batch_size: int
    source: str = "measured"

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        return from_dict(cls, data, where="run result")


def run_in_budget(workload: Workload, budget_bytes: int, *, where: str | None = None, batch_size: int | None = None,
                  device: str | torch.device | None = None, repeats: int = 3) -> RunResult:
    """Runs one inference batch of `workload` with at most `budget_bytes` of weights resident.

    The plain model runs first where it fits (its output is the reference, its time the
    baseline), then the model is offloaded with `offload`, run once under the allocator profiler
    (peak) and `repeats` times for latency, and restored to where it was.

    Args:
        workload: what to run; its model may be on the CPU.
        budget_bytes: the most parameter bytes resident in compute memory.
        where: `disk` or `cpu` (see `offload`; default: `cpu` on CUDA, `disk` on CPU).
        batch_size: samples in the batch (default: the workload's).
        device: the compute device (default: CUDA when available, else the CPU).
        repeats: timed forwards of each kind.

    Returns:
        A `RunResult` (bytes, ms). `max_abs_diff` is None when the plain model does not fit the
        compute device (CUDA out of memory).
    """
    if not isinstance(workload, Workload):
        raise BadInputError(f"workload: expected a memwise.Workload, got {type(workload).__name__}")
    positive_int(repeats, "repeats")
    batch_size = positive_int(batch_size, "batch_size") if batch_size is not None else workload.default_batch_size
    try:
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise BadInputError(f"device: cannot read {device!r}; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("device: CUDA is not available on this machine; use --device cpu")
    model = workload.model
    was_training = model.training
    home = next(model.parameters()).device
    model.eval()
    inputs = inference_inputs(model, workload.make_batch(batch_size))
    inputs = type(inputs)(tuple(t.to(device) for t in inputs.args), {k: t.to(device) for k, t in inputs.kwargs.items()})
    weight_bytes = sum({p.untyped_storage().data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())
    with torch.no_grad():
        plain, plain_ms = _plain_run(model, inputs, device, home, repeats)
        handle = offload(model, budget_bytes, where, device=device)
        try:
            handle.evict_streamed()
            handle.reset_peak()
            outputs: list[torch.Tensor] = []

            def step(_: int, marker: Any) -> None:
                outputs[:] = flat_outputs(inputs.call(model))

            log, _ = record_steps(step, model, persistent_tensors(model), mode="infer", steps=1, device=device, with_marks=False)
            peak_bytes = log.summarize().peak_bytes
            resident_max = handle.resident_weight_bytes_max
            offloaded_ms = _median_ms(lambda: inputs.call(model), repeats, device)
            pinned = tuple(handle.pinned_units)
            where_used = handle.where
        finally:
            handle.remove()
            model.to(home)
            model.train(was_training)
    max_abs_diff = None
    if plain is not None:
        max_abs_diff = max(((a.double().cpu() - b.double().cpu()).abs().max().item() for a, b in zip(plain, outputs) if a.numel()),
                           default=0.0)
    return RunResult(
        peak_bytes=peak_bytes, resident_weight_bytes_max=resident_max, budget_bytes=budget_bytes, weight_bytes=weight_bytes,
        latency_ms=offloaded_ms, plain_latency_ms=plain_ms, max_abs_diff=max_abs_diff, where=where_used, device=str(device),
        pinned_units=pinned, workload=workload.name, batch_size=batch_size,
    )


def _plain_run(model: torch.nn.Module, inputs: Any, device: torch.device, home: torch.device,
               repeats: int) -> tuple[list[torch.Tensor] | None, float | None]:
    """The plain model's outputs and median ms on `device`, or (None, None) when it does not fit there."""
    try:
        model.to(device)
        return flat_outputs(inputs.call(model)), _median_ms(lambda: inputs.call(model), repeats, device)
    except torch.OutOfMemoryError:
        return None, None
    finally:
        model.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _median_ms(function: Any, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
