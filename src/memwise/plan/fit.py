"""What "fits" means for the planner and the batch-size finder, on an estimate and on real steps.

On the CPU the figure compared to the budget is the allocator's peak (parameters included). On a
GPU it is what the process needs on the device: the caching allocator's reserved peak (which
includes its fragmentation) plus the CUDA context. A prediction fits when it leaves `margin` of
the budget free; a measurement fits when it is within the budget.
"""

import dataclasses

import torch

from memwise.core.checks import positive_int
from memwise.core.devices import DeviceSpec
from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe
from memwise.core.workload import Workload
from memwise.estimate.estimator import Estimate
from memwise.measure.profile import profile

DEFAULT_MARGIN = 0.05
CONFIRM_STEPS = 2  # the second step is the steady state: optimizer state lives through forward and backward


def check_budget(budget_bytes: int, margin: float) -> None:
    """Raises BadInputError for a budget that is not a positive int of bytes or a margin outside [0, 0.5)."""
    positive_int(budget_bytes, "budget_bytes (bytes; parse text such as '6GiB' with memwise.parse_size)")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 0.5:
        raise BadInputError(f"margin: must be a fraction of the budget in [0, 0.5), got {margin!r}")


def predicted_bytes(estimate: Estimate) -> int:
    """The estimate's figure to compare with a budget: total on the device (CUDA) or the peak (CPU)."""
    return estimate.total_bytes


def predicted_fits(estimate: Estimate, budget_bytes: int, margin: float) -> bool:
    """True when the prediction leaves `margin * budget_bytes` free."""
    return predicted_bytes(estimate) <= budget_bytes * (1 - margin)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Confirmation:
    """The result of real steps of a recipe.

    Attributes:
        measured_bytes: the measured figure comparable to the budget, None when the steps ran out
            of memory.
        real_steps: steps run.
        note: what was measured.
    """

    measured_bytes: int | None
    real_steps: int
    note: str


def can_confirm(spec: DeviceSpec) -> bool:
    """Real steps can confirm a plan for `spec` on this machine (a CPU target, or a GPU here)."""
    return spec.kind == "cpu" or torch.cuda.is_available()


def confirm(workload: Workload, recipe: Recipe, spec: DeviceSpec, estimate: Estimate) -> Confirmation:
    """Runs `CONFIRM_STEPS` real steps under `memwise.profile` and returns the measured figure.

    On a GPU the allocator's measured peak is raised by the fragmentation and context the
    estimate predicted (reserved + context - allocated), since `profile` reports allocated bytes.
    Errors other than running out of memory propagate: a step that fails for another reason is
    the workload's error, not an infeasible budget.
    """
    device = "cpu" if spec.kind == "cpu" else "cuda"
    try:
        measured = profile(workload, recipe, steps=CONFIRM_STEPS, device=device)
    except torch.OutOfMemoryError as error:
        return Confirmation(measured_bytes=None, real_steps=CONFIRM_STEPS, note=f"ran out of memory: {error}")
    if spec.kind == "cpu":
        return Confirmation(measured_bytes=measured.peak_bytes, real_steps=CONFIRM_STEPS,
                            note=f"measured by memwise.profile over {CONFIRM_STEPS} real steps (allocator peak)")
    allocated = measured.cuda_max_allocated_bytes or measured.peak_bytes
    overhead = max(estimate.total_bytes - estimate.peak_bytes, 0)
    return Confirmation(measured_bytes=allocated + overhead, real_steps=CONFIRM_STEPS,
                        note=(f"measured allocated peak {allocated} bytes over {CONFIRM_STEPS} real CUDA steps, plus the "
                              f"predicted allocator fragmentation and context ({overhead} bytes)"))
