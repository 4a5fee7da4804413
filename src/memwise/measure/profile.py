"""`profile`: measure where memory goes in real steps of a workload."""

import copy
import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

import torch

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError
from memwise.core.recipe import Mode, Recipe
from memwise.core.step import StepRunner, resolve_recipe, run_device
from memwise.core.workload import Workload
from memwise.measure.memory_log import Breakdown
from memwise.measure.observer import StepObserver
from memwise.measure.reference import reference_peak_bytes
from memwise.measure.tracker import persistent_tensors, record_steps, storage_key

ProgressCallback = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Profile(Breakdown):
    """Memory of real steps, measured from allocator events.

    The `Breakdown` fields (peak_bytes, baseline_bytes, by_category, by_module, phase_at_peak,
    step_at_peak, timeline) are measured: `peak_bytes` is the most bytes live at once over the
    steps (parameters and optimizer state included), from the allocator's events; `baseline_bytes`
    is what was live before the first step (parameters and buffers).

    Attributes:
        step_ms: median wall time of a step while tracked (steps after the first when there are several).
        reference_peak_bytes: `verify=True`: the peak of the same steps run again on a fresh copy
            of the model with no memwise hooks, read from the allocator alone (on CPU the running
            sum of the profiler's memory events, on CUDA `torch.cuda.max_memory_allocated`) by
            `memwise.measure.reference`, which shares no code with the measurement; else None.
        cuda_max_allocated_bytes: `torch.cuda.max_memory_allocated` over the tracked steps
            minus what was allocated before them plus the baseline (CUDA only), else None.
    """

    workload: str
    mode: Mode
    batch_size: int
    recipe: Recipe
    device: str
    torch_version: str
    steps: int
    step_ms: float
    reference_peak_bytes: int | None = None
    cuda_max_allocated_bytes: int | None = None
    source: str = "measured"


def profile(
    workload: Workload,
    recipe: Recipe | None = None,
    *,
    steps: int = 3,
    mode: Mode | str = Mode.TRAIN,
    device: str | torch.device = "cpu",
    verify: bool = False,
    progress: ProgressCallback | None = None,
) -> Profile:
    """Runs `steps` real steps of `workload` under `recipe` and measures their memory.

    The workload's model is not touched: the steps run on a deep copy, so profiling the same model
    again gives the same answer.

    Args:
        workload: what to run.
        recipe: how to run it; None means the defaults with the workload's batch size.
        steps: how many steps to measure (>= 1).
        mode: `train` (forward, loss, backward, optimizer step, zero_grad) or `infer`.
        device: `cpu` or a CUDA device.
        verify: also run the steps again without memwise's hooks and report the allocator's own
            peak for them as `reference_peak_bytes` (see `memwise.measure.reference`).
        progress: called as `progress(done, total)` after every step.

    Returns:
        A `Profile`; all sizes in bytes, `step_ms` in milliseconds.

    Known limitations:
        Memory allocated outside PyTorch's allocators (e.g. a library's own malloc) is not seen.
    """
    if not isinstance(workload, Workload):
        raise BadInputError(f"workload: expected a memwise.Workload, got {type(workload).__name__}")
    if any(param.is_meta for param in workload.model.parameters()):
        raise BadInputError(
            f"workload {workload.name!r}: its parameters are on the meta device (no weights); profile runs real steps: "
            "build it with real weights (load_workload(..., materialize=True)) or use estimate"
        )
    positive_int(steps, "steps")
    mode = _mode(mode)
    recipe = resolve_recipe(workload, recipe)
    device = run_device(device)
    total_steps = steps * (2 if verify else 1)
    done = [0]
    if progress is not None:
        progress(0, total_steps)

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total_steps)

    log, step_ms, cuda_peak = _measure(workload, recipe, mode, device, steps, tick=tick)
    breakdown: Breakdown = log.summarize()
    reference = None
    if verify:
        reference = reference_peak_bytes(lambda: _plain_steps(workload, recipe, mode, device, steps, tick), device)
    timed = step_ms[1:] if len(step_ms) > 1 else step_ms
    return Profile(
        workload=workload.name,
        mode=mode,
        batch_size=recipe.batch_size,
        recipe=recipe,
        device=str(device),
        torch_version=torch.__version__,
        steps=steps,
        **breakdown.breakdown_fields(),
        step_ms=statistics.median(timed),
        reference_peak_bytes=reference,
        cuda_max_allocated_bytes=cuda_peak,
    )


def _measure(
    workload: Workload, recipe: Recipe, mode: Mode, device: torch.device, steps: int, *,
    tick: Callable[[], None],
) -> tuple[Any, list[float], int | None]:
    model = copy.deepcopy(workload.model).to(device)
    observer = StepObserver(model, storage_key)
    runner = StepRunner(workload, recipe, mode, model, device, on_phase=observer.on_phase, on_batch=observer.on_batch)
    observer.optimizer = runner.optimizer

    def run_step(step: int, marker: Any) -> None:
        observer.marker, observer.step = marker, step
        runner.step()
        tick()

    cuda_peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    persistent = persistent_tensors(model, runner.handle.effects.optimizer_owned)
    log, step_ms = record_steps(run_step, model, persistent, mode=mode.value, steps=steps, device=device)
    log.notes.extend(runner.handle.notes)
    runner.close()
    if device.type == "cuda":
        baseline = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t, _, _ in persistent}.values())
        cuda_peak = torch.cuda.max_memory_allocated(device) - allocated_before + baseline
    return log, step_ms, cuda_peak


def _plain_steps(workload: Workload, recipe: Recipe, mode: Mode, device: torch.device, steps: int, tick: Callable[[], None]) -> None:
    """The measured steps with nothing of memwise's measurement around them: for the reference peak."""
    model = copy.deepcopy(workload.model).to(device)  # inside the reference's window: the weights count
    runner = StepRunner(workload, recipe, mode, model, device)
    for _ in range(steps):
        runner.step()
        tick()
    runner.close()


def _mode(mode: Mode | str) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise BadInputError(f"mode: invalid value {mode!r}; valid values are train, infer") from None
