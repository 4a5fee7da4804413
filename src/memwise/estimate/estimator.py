"""`estimate`: a step's peak memory for a target device, before running it there."""

import dataclasses
import time
from collections.abc import Collection

import psutil

from memwise.core.devices import DeviceSpec, custom_device, get_device
from memwise.core.errors import BadInputError
from memwise.core.recipe import Mode, OptimizerImpl, OptimizerStateDtype, Precision, Recipe
from memwise.core.step import resolve_recipe
from memwise.core.workload import Workload
from memwise.estimate.cuda_allocator import replay_caching_allocator, round_size
from memwise.estimate.block_stack import BlockTagger, find_block_stack, stacked_step_log
from memwise.estimate.fake_run import fake_step_log
from memwise.estimate.op_probe import OpProbe
from memwise.measure.memory_log import HOST, Breakdown, MemoryLog
from memwise.measure.tracker import module_names
from memwise.strategies.allocator import parse_allocator_settings

# Error bands, from the accuracy grid in docs/benchmarks.md. On CPU every op's scratch is probed,
# so the estimate tracks the allocator to well under 1%; the band covers allocator-order effects
# and ops too large to probe. For CUDA targets the kernels differ from the CPU ones replayed here.
_CPU_BAND = (0.03, 0.03)
_CUDA_BAND = (0.05, 0.10)
MAX_PROBE_BYTES = 64 * 2**20  # ops with more operand bytes are probed at a smaller batch, or not at all
_STEPS = 2  # the second step is the steady state: optimizer state exists through forward and backward


@dataclasses.dataclass(frozen=True, kw_only=True)
class WhatIf:
    """One alternative configuration and its predicted peak."""

    change: str
    peak_bytes: int
    fits: bool | None
    method: str  # "estimated" (a full symbolic run) or "analytic" (derived from this estimate's categories)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Contributor:
    """A category or module that holds a large share of the peak."""

    name: str
    bytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Estimate(Breakdown):
    """Predicted memory of a step on a target device, made without allocating its tensors.

    The `Breakdown` fields are predicted: `peak_bytes` is the peak of allocated bytes (on CUDA: as
    `torch.cuda.max_memory_allocated` reports it, block sizes rounded by the caching allocator).

    Attributes:
        low_bytes, high_bytes: the stated error range around `peak_bytes`.
        reserved_bytes: CUDA only: predicted peak the caching allocator reserves from the driver.
        context_bytes: CUDA only: the CUDA context and library handles, outside the allocator.
        total_bytes: what the process needs on the device: reserved + context on CUDA, peak on CPU.
        capacity_bytes: the device's memory (or `--device-memory`), None for an unbounded CPU.
        budget_bytes: the budget checked, the smaller of capacity and `--budget`.
        fits: `total_bytes <= budget_bytes`, None when there is no budget.
        what_if: alternatives and their predicted peaks (with a budget or a device).
        next_batch_bytes: what one more batch costs on the device: a loader that copies the next
            batch to the device during the step (prefetch to device) adds this to the peak.
        assumptions: what the estimate took for granted.
        elapsed_s: seconds the estimate took.
    """

    workload: str
    mode: Mode
    batch_size: int
    recipe: Recipe
    device: str
    low_bytes: int
    high_bytes: int
    reserved_bytes: int | None
    context_bytes: int | None
    total_bytes: int
    capacity_bytes: int | None
    budget_bytes: int | None
    fits: bool | None
    top_contributors: tuple[Contributor, ...]
    what_if: tuple[WhatIf, ...]
    assumptions: tuple[str, ...]
    elapsed_s: float
    next_batch_bytes: int = 0
    source: str = "estimated"


def resolve_device(device: str | DeviceSpec, device_memory_bytes: int | None = None) -> DeviceSpec:
    """The target device: `cpu`, a catalog name, or a DeviceSpec; `device_memory_bytes` overrides its capacity."""
    if isinstance(device, DeviceSpec):
        spec = device
    elif str(device).lower() == "cpu":
        spec = DeviceSpec(name="cpu", kind="cpu", memory_bytes=psutil.virtual_memory().total, context_bytes=0,
                          description="this machine's host memory")
    elif str(device).lower() in ("cuda", "gpu", "custom"):
        if device_memory_bytes is None:
            raise BadInputError(f"device {device!r}: give its size with --device-memory, or name a catalog GPU (see `memwise devices`)")
        spec = custom_device(device_memory_bytes)
    else:
        spec = get_device(str(device))
    if device_memory_bytes is not None:
        spec = dataclasses.replace(spec, memory_bytes=device_memory_bytes)
    return spec


def estimate(
    workload: Workload,
    recipe: Recipe | None = None,
    device: str | DeviceSpec = "cpu",
    *,
    mode: Mode | str = Mode.TRAIN,
    device_memory_bytes: int | None = None,
    budget_bytes: int | None = None,
    what_if: bool | None = None,
) -> Estimate:
    """Predicts the peak memory of a step of `workload` under `recipe` on `device`.

    The step runs on fake tensors on this machine's CPU, so nothing of the model's size is
    allocated; a model built on the meta device works too.

    Args:
        workload: what to run.
        recipe: how to run it; None means the defaults with the workload's batch size.
        device: `cpu`, a GPU from the catalog (`memwise devices`), or a DeviceSpec.
        mode: `train` or `infer`.
        device_memory_bytes: overrides the device's capacity.
        budget_bytes: a budget below the capacity to check against.
        what_if: compute alternative configurations; default: when there is a budget or a GPU.

    Returns:
        An `Estimate`, sizes in bytes.

    Assumptions:
        CPU: scratch memory of each op's kernel is learned by running that op once for real on
        random inputs of the same shapes (ops with more than 64 MiB of inputs and outputs are not
        probed). CUDA: allocations are replayed through a model of the caching allocator;
        kernel workspaces other than the outputs are not modelled; autocast follows the op
        lists of CUDA; built-in optimizers use the multi-tensor (foreach) path, as on CUDA by default.

    Known limitations:
        Ops with data-dependent shapes, `.item()` in forward/backward and custom C++ ops without
        a fake implementation raise SymbolicExecutionError; measure those with `profile`.
    """
    started = time.perf_counter()
    if not isinstance(workload, Workload):
        raise BadInputError(f"workload: expected a memwise.Workload, got {type(workload).__name__}")
    mode = Mode(mode) if not isinstance(mode, Mode) else mode
    recipe = resolve_recipe(workload, recipe)
    spec = resolve_device(device, device_memory_bytes)
    probe = OpProbe(max_probe_bytes=MAX_PROBE_BYTES) if spec.kind == "cpu" else None
    run = _run(workload, recipe, mode, spec, probe)
    breakdown, reserved = run.breakdown, run.reserved_bytes
    assumptions = _assumptions(spec, probe, recipe) + list(run.notes) + list(workload.extras.get("assumptions", ()))  # e.g. how the model was built
    low_band, high_band = _CPU_BAND if spec.kind == "cpu" else _CUDA_BAND
    # an op whose scratch is not modelled may hold up to about its operands' bytes more while it
    # runs; one op runs at a time, so the range widens by the largest such op
    unmodelled_bytes = max(probe.unmodelled_bytes.values(), default=0) if probe is not None else 0
    context = spec.context_bytes if spec.kind == "cuda" else None
    total = (reserved + context) if spec.kind == "cuda" else breakdown.peak_bytes
    capacity = spec.memory_bytes if (spec.kind == "cuda" or device_memory_bytes is not None) else None
    budgets = [b for b in (capacity, budget_bytes) if b is not None]
    budget = min(budgets) if budgets else None
    want_what_if = what_if if what_if is not None else budget is not None
    rows = _what_if(workload, recipe, mode, spec, breakdown, total, budget) if want_what_if else ()
    return Estimate(
        workload=workload.name,
        mode=mode,
        batch_size=recipe.batch_size,
        recipe=recipe,
        device=spec.name,
        **breakdown.breakdown_fields(),
        low_bytes=int(breakdown.peak_bytes * (1 - low_band)),
        high_bytes=int(breakdown.peak_bytes * (1 + high_band)) + unmodelled_bytes,
        reserved_bytes=reserved if spec.kind == "cuda" else None,
        context_bytes=context,
        total_bytes=total,
        capacity_bytes=capacity,
        budget_bytes=budget,
        fits=None if budget is None else total <= budget,
        top_contributors=_top_contributors(breakdown),
        what_if=rows,
        next_batch_bytes=run.batch_bytes,
        assumptions=tuple(assumptions),
        elapsed_s=time.perf_counter() - started,
    )


@dataclasses.dataclass(frozen=True)
class _RunResult:
    breakdown: Breakdown
    reserved_bytes: int
    batch_bytes: int
    notes: tuple[str, ...]


def trace_log(
    workload: Workload, recipe: Recipe, mode: Mode, spec: DeviceSpec, probe: OpProbe | None, *,
    blocks: BlockTagger | None = None, backward_marks: Collection[str] = (),
) -> MemoryLog:
    """The log of the estimator's fake steps of `workload` on `spec`, every block traced (see
    `fake_step_log` for `blocks` and `backward_marks`)."""
    cuda = spec.kind == "cuda"
    return fake_step_log(
        workload, recipe, mode, steps=_STEPS if mode == Mode.TRAIN else 1,
        round_size=round_size if cuda else (lambda nbytes: nbytes), probe=probe,
        optimizer_foreach=True if cuda else None, cuda_autocast=cuda, offload_to_host=cuda, blocks=blocks,
        backward_marks=backward_marks,
    )


def _run(workload: Workload, recipe: Recipe, mode: Mode, spec: DeviceSpec, probe: OpProbe | None) -> _RunResult:
    cuda = spec.kind == "cuda"

    def trace(blocks: BlockTagger | None = None) -> MemoryLog:
        return trace_log(workload, recipe, mode, spec, probe, blocks=blocks)

    stack = find_block_stack(workload.model)
    log, how = (stacked_step_log(trace, stack, module_names(workload.model)) if stack else (None, ""))
    notes = (how,) if log is not None else ()
    if log is None:
        if stack is not None:
            notes = (f"all {stack.count} blocks of {stack.path} traced one by one: {how}",)
        log = trace()
    breakdown = log.summarize()
    batch_bytes = _batch_bytes(log)
    if not cuda:
        return _RunResult(breakdown, breakdown.peak_bytes, batch_bytes, notes)
    allocator_events = [
        event[:3] if event[0] == "alloc" else event[:2]
        for event in log.events
        if event[0] == "free" or (event[0] == "alloc" and event[3] != HOST)
    ]
    settings = parse_allocator_settings(recipe.allocator)
    max_split = settings.get("max_split_size_mb")
    replay = replay_caching_allocator(
        allocator_events,
        expandable_segments=settings.get("expandable_segments") == "True",
        max_split_size_bytes=int(float(max_split) * 2**20) if max_split else None,
    )
    return _RunResult(breakdown, replay.peak_reserved_bytes, batch_bytes, notes)


def _batch_bytes(log: MemoryLog) -> int:
    """Bytes of the first batch the log claims as input."""
    claimed = next((event[2] for event in log.events if event[0] == "claim" and event[1] == "input"), [])
    keys = {key for key, _ in claimed}
    return sum(event[2] for event in log.events if event[0] == "alloc" and event[1] in keys and event[3] != HOST)


def _assumptions(spec: DeviceSpec, probe: OpProbe | None, recipe: Recipe) -> list[str]:
    notes = [
        "the step runs as memwise runs it: forward, loss, backward, optimizer.step(), zero_grad(set_to_none=True)",
        "the batch stays alive through backward and the optimizer step, as in a user's `for batch in loader:` loop; "
        "a loader that prefetches the next batch to the device adds next_batch_bytes",
    ]
    if spec.kind == "cpu":
        notes.append(f"CPU kernel scratch learned from {probe.probed} real single-op probes")
        if probe.unmodelled_bytes:
            names = ", ".join(sorted(probe.unmodelled_bytes)[:5])
            notes.append(f"scratch of ops too large to probe or reading a kernel's private workspace is not modelled ({names}); "
                         f"high_bytes is widened by the largest one's operand bytes, {max(probe.unmodelled_bytes.values())}")
    else:
        notes.append(f"CUDA caching allocator modelled (512-byte rounding, 2 MiB small / 20 MiB large segments); context {spec.context_bytes} bytes")
        notes.append("CUDA kernel workspaces (cuBLAS, cuDNN, attention) beyond their outputs are not modelled")
        if recipe.precision in (Precision.BF16, Precision.FP16):
            notes.append("autocast follows CUDA's op lists (PyTorch's autocast_mode.h), replayed on CPU fake tensors")
        if recipe.optimizer_impl is None:
            notes.append("built-in optimizers use the multi-tensor (foreach) implementation, PyTorch's default on CUDA")
    if recipe.optimizer_impl is not None:
        notes.append(f"built-in optimizers use the {recipe.optimizer_impl.value} implementation (optimizer_impl)")
    return notes


def _top_contributors(breakdown: Breakdown) -> tuple[Contributor, ...]:
    categories = sorted(breakdown.by_category.items(), key=lambda item: -item[1])
    return tuple(Contributor(name=name, bytes=value) for name, value in categories[:3] if value > 0)


def _what_if(
    workload: Workload, recipe: Recipe, mode: Mode, spec: DeviceSpec, breakdown: Breakdown, total: int, budget: int | None,
) -> tuple[WhatIf, ...]:
    overhead = total - breakdown.peak_bytes  # reserved slack and context stay roughly constant

    def row(change: str, peak: int, method: str) -> WhatIf:
        return WhatIf(change=change, peak_bytes=int(peak), fits=None if budget is None else peak + overhead <= budget, method=method)

    def rerun(change: str, new_recipe: Recipe) -> WhatIf:
        other = _run(workload, new_recipe, mode, spec, OpProbe(max_probe_bytes=MAX_PROBE_BYTES) if spec.kind == "cpu" else None)
        return row(change, other.breakdown.peak_bytes, "estimated")

    # The remedies and their wording live in plan/remedies.py, the one place that knows them; it
    # imports only core/, and is imported here at call time because plan/ sits above estimate/.
    from memwise.plan.remedies import remedy_context, what_if_candidates

    context = remedy_context(recipe, train=mode == Mode.TRAIN, gpu=spec.kind == "cuda",
                             has_optimizer_factory=workload.optimizer_factory is not None)
    rows = []
    for candidate in what_if_candidates(recipe, context, peak_bytes=breakdown.peak_bytes, by_category=breakdown.by_category):
        if candidate.recipe is not None:
            rows.append(rerun(candidate.change, candidate.recipe))
        else:
            rows.append(row(candidate.change, candidate.analytic_peak_bytes, "analytic"))
    fused_applies = (mode == Mode.TRAIN and context.builtin_optimizer and recipe.optimizer_state == OptimizerStateDtype.FP32
                     and recipe.optimizer_impl != OptimizerImpl.FUSED and recipe.precision != Precision.BF16_WEIGHTS)
    if fused_applies and not any("fused" in existing.change for existing in rows):
        fused = rerun("fused optimizer (optimizer_impl fused)", recipe.replace(optimizer_impl=OptimizerImpl.FUSED))
        if fused.peak_bytes < breakdown.peak_bytes:  # offered only where it saves memory
            rows.append(fused)
    return tuple(rows)
