"""A step-time model for the planner: what each remedy costs in compute, calibrated on this machine.

    step_ms = passes * pass_ms(micro_batch) * checkpoint_factor * precision_factor
              + optimizer_ms + optimizer_delta_ms + transfer_ms
    pass_ms(m) = pass_fixed_ms + pass_per_sample_ms * m

The terms are measured, not assumed: a few real steps of the workload at a small batch, timed side
by side: plain at m and 2m, two accumulation passes of m (separates the optimizer's time from a
pass's), and each checkpoint mode, precision and optimizer setting alone at m. Offload adds its
transfers at an assumed host-link bandwidth (only for GPU targets; on the CPU it is a no-op).
With several ranks, `comm_ms` adds the collectives of DDP or FSDP2 at a stated bandwidth.
"""

import copy
import dataclasses
import statistics
import time
from collections.abc import Sequence

import torch

from memwise.core.recipe import Mode, Recipe
from memwise.core.step import StepRunner
from memwise.core.workload import Workload
from memwise.plan.remedies import Axis

# Host <-> GPU copies of offloaded tensors: PCIe 4.0 x16 moves ~25 GB/s per direction at best;
# 16 GB/s is what pinned-memory copies of many mid-sized tensors reach in practice.
HOST_LINK_BYTES_PER_MS = 16e9 / 1e3
_MIN_FACTOR = 0.05
# Bytes each rank moves per ms in a collective (bus bandwidth), stated, not measured: gloo over
# loopback on a CPU host moves ~1 GB/s per rank; NCCL within one node (NVLink or PCIe) is
# conservatively ~50 GB/s. Latency per collective is not charged.
COMM_BYTES_PER_MS = {"cpu": 1e9 / 1e3, "cuda": 50e9 / 1e3}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepTimeModel:
    """Predicts a recipe's step time (ms) from timings of a few real steps.

    Attributes:
        pass_fixed_ms, pass_per_sample_ms: one plain forward+backward pass of m samples takes
            `pass_fixed_ms + pass_per_sample_ms * m`.
        optimizer_ms: the plain optimizer step (and zero_grad).
        factors: multiplier of a pass's time by axis value label (checkpoint modes, precisions).
        optimizer_delta_ms: extra optimizer time by optimizer axis value label.
        measured_steps: real steps timed to calibrate.
        calibration_s: wall time of the calibration.
        calibrated: False when the defaults were used (the model was too large to run here).
    """

    pass_fixed_ms: float
    pass_per_sample_ms: float
    optimizer_ms: float
    factors: dict[str, float]
    optimizer_delta_ms: dict[str, float]
    measured_steps: int
    calibration_s: float
    calibrated: bool = True

    def predict_ms(self, recipe: Recipe, labels: Sequence[str], *, transfer_bytes: int = 0) -> float:
        """The predicted step time of `recipe`, whose axis values have `labels` (see `remedies.describe`)."""
        micro = recipe.micro_batch_size or recipe.batch_size
        passes = recipe.batch_size // micro
        pass_ms = self.pass_fixed_ms + self.pass_per_sample_ms * micro
        factor = 1.0
        delta = 0.0
        for label in labels:
            factor *= self.factors.get(label, 1.0)
            delta += self.optimizer_delta_ms.get(label, 0.0)
        return passes * pass_ms * factor + max(0.0, self.optimizer_ms + delta) + transfer_bytes / HOST_LINK_BYTES_PER_MS


def default_step_time_model(axes: Sequence[Axis]) -> StepTimeModel:
    """Relative costs from the literature, for models too large to time here.

    Assumptions:
        full checkpointing recomputes the forward (~1/3 of a pass) -> x1.33; selective recomputes
        the cheap ops -> x1.1; every_n -> x1.17; low-precision autocast x0.7 (GPU tensor cores);
        pass time proportional to the samples; optimizer 5% of a pass.
    """
    factors = {"checkpoint full": 1.33, "checkpoint selective": 1.1, "checkpoint every_n": 1.17,
               "bf16": 0.7, "fp16": 0.7, "bf16-weights": 0.7}
    return StepTimeModel(pass_fixed_ms=0.0, pass_per_sample_ms=1.0, optimizer_ms=0.05, factors=factors,
                         optimizer_delta_ms={}, measured_steps=0, calibration_s=0.0, calibrated=False)


def calibrate_step_time(
    workload: Workload, base: Recipe, axes: Sequence[Axis], *, micro_batch_size: int, repeats: int = 2,
) -> StepTimeModel:
    """Times real steps of `workload` on this machine's CPU and fits a `StepTimeModel`.

    Each configuration runs one warm-up step, then `repeats` timed steps; the fastest counts (the
    least disturbed by other processes). All configurations run at `micro_batch_size` samples
    (plus one at twice that), so calibration stays cheap for any effective batch.

    Args:
        workload: what to run (its largest input when it declares one).
        base: the plain recipe (fp32, no checkpointing) whose non-batch fields the timings keep.
        axes: the planner's axes; every checkpoint, precision and optimizer value is timed.
        micro_batch_size: the small batch m the configurations run at.
        repeats: timed steps per configuration.

    Returns:
        The fitted model; `measured_steps` counts every real step run.

    Known limitations:
        Timings at a small batch understate how a remedy's cost grows with the batch when the
        step is memory-bound; the factors are taken as constant in the batch.
    """
    started = time.perf_counter()
    m = micro_batch_size
    steps = [0]

    def timed(recipe: Recipe) -> float:
        model = copy.deepcopy(workload.model)
        runner = StepRunner(workload, recipe, Mode.TRAIN, model, torch.device("cpu"))
        try:
            best = float("inf")
            for index in range(1 + repeats):
                batch = runner.make_batch()
                began = time.perf_counter()
                runner.step(batch)
                elapsed_ms = (time.perf_counter() - began) * 1e3
                steps[0] += 1
                if index:
                    best = min(best, elapsed_ms)
            return best
        finally:
            runner.close()
            del model

    plain = base.replace(batch_size=m, micro_batch_size=None)
    t_one = timed(plain)
    t_double = timed(base.replace(batch_size=2 * m, micro_batch_size=None))
    t_two_passes = timed(base.replace(batch_size=2 * m, micro_batch_size=m))
    # one pass of m: P(m) = t_two_passes - t_one; the optimizer: O = t_one - P(m)
    pass_m = max(t_two_passes - t_one, _MIN_FACTOR * t_one)
    optimizer_ms = max(t_one - pass_m, 0.0)
    pass_2m = max(t_double - optimizer_ms, pass_m)
    per_sample = max((pass_2m - pass_m) / m, 0.0)
    fixed = max(pass_m - per_sample * m, 0.0)

    factors: dict[str, float] = {}
    optimizer_delta: dict[str, float] = {}
    for axis in axes:
        if axis.name not in ("precision", "checkpoint", "optimizer"):
            continue
        for value in axis.values:
            changed = plain.replace(**dict(value.fields))
            if changed == plain:
                continue
            elapsed = timed(changed)
            if axis.name == "optimizer":
                optimizer_delta[value.label] = elapsed - t_one
            else:
                factor = max((elapsed - optimizer_ms) / pass_m, _MIN_FACTOR)
                # recomputation never makes a pass faster; a timing below 1 is noise
                factors[value.label] = max(factor, 1.0) if axis.name == "checkpoint" else factor
    return StepTimeModel(pass_fixed_ms=fixed, pass_per_sample_ms=per_sample, optimizer_ms=optimizer_ms, factors=factors,
                         optimizer_delta_ms=optimizer_delta, measured_steps=steps[0],
                         calibration_s=time.perf_counter() - started)


def time_side_by_side(workload: Workload, recipes: Sequence[Recipe], rounds: int) -> dict[Recipe, float]:
    """Median step time (ms) of each recipe on this machine's CPU over `rounds` interleaved rounds.

    One runner per recipe (its own copy of the model), each warmed up by one step; then every round
    times one step of every recipe, in an order rotated each round, so that a burst of load on a
    shared machine hits all of them alike.
    """
    runners: dict[Recipe, StepRunner] = {}
    times: dict[Recipe, list[float]] = {recipe: [] for recipe in recipes}
    order = list(recipes)
    try:
        for recipe in order:  # inside the try: a runner that fails to build leaves none of the others open
            runners[recipe] = StepRunner(workload, recipe, Mode.TRAIN, copy.deepcopy(workload.model), torch.device("cpu"))
        for runner in runners.values():
            runner.step(runner.make_batch())
        for round_index in range(rounds):
            shift = round_index % len(order)
            for recipe in order[shift:] + order[:shift]:
                runner = runners[recipe]
                batch = runner.make_batch()
                began = time.perf_counter()
                runner.step(batch)
                times[recipe].append((time.perf_counter() - began) * 1e3)
    finally:
        for runner in runners.values():
            runner.close()
    return {recipe: statistics.median(values) for recipe, values in times.items()}


def comm_bytes_per_pass(strategy: str, param_bytes: int, nproc: int) -> int:
    """Bytes each rank sends per forward+backward pass under `strategy` (ring collectives).

    DDP all-reduces the gradients after every backward (memwise's accumulation does not use
    `no_sync`): a ring all-reduce moves 2 (n-1)/n of them. FSDP2 (reshard after forward)
    all-gathers the parameters in forward and again in backward and reduce-scatters the
    gradients: 3 (n-1)/n of the parameter bytes.
    """
    share = (nproc - 1) / nproc
    factor = 2 if strategy == "ddp" else 3
    return int(factor * share * param_bytes)


def comm_ms(bytes_per_rank: int, device_kind: str) -> float:
    """Time in ms to move `bytes_per_rank` in collectives at `COMM_BYTES_PER_MS[device_kind]`.

    Known limitations:
        Assumes no overlap with compute (DDP and FSDP2 overlap much of it, so this is an upper
        bound) and no per-collective latency; the bandwidths are stated, not calibrated here.
    """
    return bytes_per_rank / COMM_BYTES_PER_MS.get(device_kind, COMM_BYTES_PER_MS["cpu"])
