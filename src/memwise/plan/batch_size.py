"""`find_batch_size`: the largest batch that fits a budget, by bisection on estimates, confirmed by real steps.

Peers search with real trials (Accelerate halves from a start value until a step runs; Lightning
doubles until one fails), and size on whatever inputs those trials drew. Peak memory is monotone in
the batch size, so memwise bisects on the estimator, sizes for the workload's largest input, and
spends real steps only to confirm the answer.
"""

import dataclasses
import time
from typing import Any

from memwise.core.checks import positive_int
from memwise.core.devices import DeviceSpec
from memwise.core.errors import BadInputError
from memwise.core.recipe import Mode, Recipe
from memwise.core.serialize import from_dict, to_dict
from memwise.core.step import resolve_recipe
from memwise.core.workload import Workload
from memwise.estimate.estimator import Estimate, estimate, resolve_device
from memwise.plan.fit import (
    DEFAULT_MARGIN,
    can_confirm,
    check_budget,
    confirm,
    predicted_bytes,
)
from memwise.plan.input_sizing import DEFAULT_SAMPLES, InputSizing, LargestInput

MAX_BATCH_SIZE = 2**16
MAX_CONFIRMATIONS = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchSizeResult:
    """The largest batch that fits a budget. Frozen; round-trips through JSON.

    Attributes:
        feasible: a batch of at least 1 fits.
        batch_size: the largest fitting batch (one forward/backward pass), None when infeasible.
        trials: real steps run to confirm.
        predicted_peak_bytes: the estimator's figure at `batch_size` (at batch 1 when infeasible).
        measured_peak_bytes: measured by real steps, None when not confirmed.
        sized_for: the input sized for.
        budget_bytes, device, workload, recipe: what was asked (`recipe.batch_size` is the answer).
        estimates: estimator runs of the bisection.
        notes: what was assumed or not done.
        elapsed_s: wall time.
    """

    feasible: bool
    batch_size: int | None
    trials: int
    predicted_peak_bytes: int
    measured_peak_bytes: int | None
    sized_for: InputSizing
    budget_bytes: int
    device: str
    workload: str
    recipe: Recipe
    estimates: int
    notes: tuple[str, ...]
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BatchSizeResult":
        return from_dict(cls, data, where="batch_size_result")


def find_batch_size(
    workload: Workload,
    budget_bytes: int,
    recipe: Recipe | None = None,
    *,
    device: str | DeviceSpec = "cpu",
    margin: float = DEFAULT_MARGIN,
    samples: int = DEFAULT_SAMPLES,
    max_batch_size: int = MAX_BATCH_SIZE,
    confirm_steps: bool = True,
) -> BatchSizeResult:
    """The largest batch of `workload` under `recipe` whose training step fits `budget_bytes`.

    Doubles the batch on estimates until one does not fit, bisects between the last two, then
    runs two real steps (`memwise.profile`) at the answer; if they exceed the budget, it scales the
    predictions by the measured/predicted ratio and confirms the new answer once more.

    Args:
        workload: what to train.
        budget_bytes: the budget in bytes (see `memwise.plan`).
        recipe: the rest of the recipe (precision, checkpointing, ...); its batch fields are
            replaced: the answer is the batch of one forward/backward pass (no accumulation).
        device: `cpu` or a GPU from the catalog.
        margin: fraction of the budget a prediction must leave free.
        samples: draws of `make_batch` per batch size when the workload declares no `make_largest_batch`.
        max_batch_size: the largest batch tried.
        confirm_steps: run the real steps (False: estimate only).

    Returns:
        A `BatchSizeResult`; `feasible` is False when not even a batch of 1 fits.

    Assumptions:
        The peak is monotone in the batch size.
    """
    started = time.perf_counter()
    if not isinstance(workload, Workload):
        raise BadInputError(f"workload: expected a memwise.Workload, got {type(workload).__name__}")
    check_budget(budget_bytes, margin)
    positive_int(samples, "samples")
    positive_int(max_batch_size, "max_batch_size")
    spec = resolve_device(device)
    inputs = LargestInput(workload, samples=samples)
    base = resolve_recipe(workload, recipe).replace(micro_batch_size=None)
    cache: dict[int, Estimate] = {}

    def predicted(batch: int) -> int:
        if batch not in cache:
            cache[batch] = estimate(inputs.workload, base.replace(batch_size=batch), spec, mode=Mode.TRAIN, what_if=False)
        return predicted_bytes(cache[batch])

    notes: list[str] = []
    trials = 0
    measured = None
    scale = 1.0
    upper = max_batch_size  # batches above it are known (or assumed) not to fit
    answer = None
    for _ in range(MAX_CONFIRMATIONS):
        limit = budget_bytes * (1 - margin) / scale
        answer = _largest_fitting(predicted, limit, upper)
        if answer is None or not confirm_steps or not can_confirm(spec):
            break
        confirmation = confirm(inputs.workload, base.replace(batch_size=answer), spec, cache[answer])
        trials += confirmation.real_steps
        measured = confirmation.measured_bytes
        if measured is not None and measured <= budget_bytes:
            break
        notes.append(f"confirmation at batch {answer} failed: "
                     + (f"measured {measured} bytes > budget" if measured is not None else confirmation.note))
        scale = max(scale, (measured or 2 * predicted(answer)) / predicted(answer))
        upper = answer - 1
        answer, measured = None, None
    if answer is not None and (not confirm_steps or not can_confirm(spec)):
        notes.append("nothing was confirmed: the batch size rests on the estimate alone"
                     + ("" if confirm_steps else " (confirmation off)"))
    if answer is not None and answer == max_batch_size:
        notes.append(f"batch {max_batch_size} (the largest tried) fits; a larger one may too")
    shown = answer or 1
    sizing = inputs.sizing(shown)
    notes.append(sizing.note)
    return BatchSizeResult(
        feasible=answer is not None,
        batch_size=answer,
        trials=trials,
        predicted_peak_bytes=predicted(shown),
        measured_peak_bytes=measured,
        sized_for=sizing,
        budget_bytes=budget_bytes,
        device=spec.name,
        workload=workload.name,
        recipe=base.replace(batch_size=shown),
        estimates=len(cache),
        notes=tuple(notes),
        elapsed_s=round(time.perf_counter() - started, 3),
    )


def _largest_fitting(predicted: Any, limit: float, upper: int) -> int | None:
    """The largest batch in [1, upper] with `predicted(batch) <= limit` (predicted is monotone)."""
    if upper < 1 or predicted(1) > limit:
        return None
    low, high = 1, None  # low fits; high does not (None: unknown yet)
    while high is None:
        probe = min(low * 2, upper)
        if probe == low:
            return low
        if predicted(probe) <= limit:
            low = probe
        else:
            high = probe
    while high - low > 1:
        middle = (low + high) // 2
        if predicted(middle) <= limit:
            low = middle
        else:
            high = middle
    return low
