"""A step-time model for the planner: what each remedy costs in compute, calibrated on this machine.

    step_ms = passes * pass_ms(micro_batch) * checkpoint_factor * precision_factor
              + optimizer_ms + optimizer_delta_ms + transfer_ms
    pass_ms(m) = pass_fixed_ms + pass_per_sample_ms * m

The terms are measured, not assumed: real steps of the workload at the micro-batch sizes the search
considers, interleaved and timed side by side (median of a few rounds): plain at the largest
micro-batch M and the smallest m, M/m accumulation passes of m (separates the optimizer's time from
a pass's), and each checkpoint mode, precision and optimizer setting alone at M. Offload adds its
transfers at an assumed host-link bandwidth (only for GPU targets; on the CPU it is a no-op).
With several ranks, `comm_ms` adds the collectives of DDP or FSDP2 at a stated bandwidth.
"""

import copy
import dataclasses
import statistics
import time
from collections.abc import Sequence

import psutil
import torch

from memwise.core.recipe import Mode, Recipe
from memwise.core.step import StepRunner
from memwise.core.workload import Workload
from memwise.plan.remedies import Axis

# Host <-> GPU copies of offloaded tensors: PCIe 4.0 x16 moves ~25 GB/s per direction at best;
# 16 GB/s is what pinned-memory copies of many mid-sized tensors reach in practice.
HOST_LINK_BYTES_PER_MS = 16e9 / 1e3
_MIN_FACTOR = 0.05
# Calibration times steps at the largest searched micro-batch; above this size it times the largest
# one not above it instead, so calibration costs at most ~(1 + repeats) (3 + values) steps of 64 samples.
CALIBRATION_MAX_MICRO_BATCH = 64
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
    workload: Workload, base: Recipe, axes: Sequence[Axis], *, micro_batch_sizes: Sequence[int], repeats: int = 3,
) -> StepTimeModel:
    """Times real steps of `workload` on this machine's CPU and fits a `StepTimeModel`.

    The pass time is measured at the micro-batch sizes the search considers: the smallest (m) and
    the largest (M) of `micro_batch_sizes`. Configurations: plain at M, plain at m, M/m (at least 2) accumulation
    passes of m (which separates a pass's time from the optimizer's), and each checkpoint,
    precision and optimizer value alone at M, so a remedy's factor is the one it has at the batch
    a plan runs. All configurations are built first and warmed up, then run in `repeats`
    interleaved rounds (rotated order, so a burst of load on a shared machine hits every
    configuration alike); each configuration's time is the median of its rounds.

    Args:
        workload: what to run (its largest input when it declares one).
        base: the plain recipe (fp32, no checkpointing) whose non-batch fields the timings keep.
        axes: the planner's axes; every checkpoint, precision and optimizer value is timed.
        micro_batch_sizes: the micro-batch sizes the search considers (the unsplit batch included).
        repeats: interleaved timed rounds per configuration.

    Returns:
        The fitted model; `measured_steps` counts every real step run: (1 + repeats) per
        configuration, 3 + one per timed axis value configurations, each of at most M samples
        (about (1 + repeats) (3 + values) steps of the planned batch in all).

    Known limitations:
        Interleaving holds one model copy (with its optimizer state) per configuration; when they
        do not fit in a quarter of the available RAM, configurations run one after another. The pass time
        is linear between m and M; remedy factors are taken as constant in the micro-batch.
    """
    if not micro_batch_sizes:
        raise ValueError("micro_batch_sizes: expected at least one micro-batch size, got none")
    started = time.perf_counter()
    large = max(micro_batch_sizes)
    small = min(micro_batch_sizes)
    # about a batch of M in passes of m; at least two passes, which separate a pass from the optimizer
    passes = max(2, large // small)
    plain_large = base.replace(batch_size=large, micro_batch_size=None)
    plain_small = base.replace(batch_size=small, micro_batch_size=None)
    accumulated = base.replace(batch_size=passes * small, micro_batch_size=small)
    remedies: list[tuple[Axis, str, Recipe]] = []
    for axis in axes:
        if axis.name not in ("precision", "checkpoint", "optimizer"):
            continue
        for value in axis.values:
            changed = plain_large.replace(**dict(value.fields))
            if changed != plain_large:
                remedies.append((axis, value.label, changed))
    recipes = list(dict.fromkeys([plain_large, plain_small, accumulated, *(recipe for _, _, recipe in remedies)]))
    step_ms, steps = _interleaved_step_ms(workload, recipes, repeats)

    pass_small = max((step_ms[accumulated] - step_ms[plain_small]) / (passes - 1), _MIN_FACTOR * step_ms[plain_small])
    optimizer_ms = max(step_ms[plain_small] - pass_small, 0.0)
    pass_large = max(step_ms[plain_large] - optimizer_ms, pass_small)
    if large > small:
        per_sample = max((pass_large - pass_small) / (large - small), 0.0)
        fixed = max(pass_small - per_sample * small, 0.0)
    else:
        per_sample, fixed = pass_large / large, 0.0

    factors: dict[str, float] = {}
    optimizer_delta: dict[str, float] = {}
    for axis, label, recipe in remedies:
        elapsed = step_ms[recipe]
        if axis.name == "optimizer":
            optimizer_delta[label] = elapsed - step_ms[plain_large]
        else:
            factor = max((elapsed - optimizer_ms) / pass_large, _MIN_FACTOR)
            # recomputation never makes a pass faster; a timing below 1 is noise
            factors[label] = max(factor, 1.0) if axis.name == "checkpoint" else factor
    return StepTimeModel(pass_fixed_ms=fixed, pass_per_sample_ms=per_sample, optimizer_ms=optimizer_ms, factors=factors,
                         optimizer_delta_ms=optimizer_delta, measured_steps=steps,
                         calibration_s=time.perf_counter() - started)


def _interleaved_step_ms(workload: Workload, recipes: Sequence[Recipe], repeats: int) -> tuple[dict[Recipe, float], int]:
    """Median step time (ms) of each recipe over `repeats` timed steps after one warm-up step, and the steps run.

    The rounds are interleaved (one runner per recipe, all alive) when a model copy with gradients
    and two Adam moments per recipe fits in a quarter of the available RAM; otherwise the recipes
    run one after another, one runner at a time.
    """
    param_bytes = sum(param.numel() * param.element_size() for param in workload.model.parameters())
    together = 4 * param_bytes * len(recipes) < 0.25 * psutil.virtual_memory().available
    groups = [list(recipes)] if together else [[recipe] for recipe in recipes]
    times: dict[Recipe, list[float]] = {recipe: [] for recipe in recipes}
    steps = 0
    for group in groups:
        runners: dict[Recipe, StepRunner] = {}
        try:
            for recipe in group:
                runners[recipe] = StepRunner(workload, recipe, Mode.TRAIN, copy.deepcopy(workload.model), torch.device("cpu"))
                runners[recipe].step(runners[recipe].make_batch())
                steps += 1
            for round_index in range(repeats):
                shift = round_index % len(group)
                for recipe in [*group[shift:], *group[:shift]]:
                    batch = runners[recipe].make_batch()
                    began = time.perf_counter()
                    runners[recipe].step(batch)
                    times[recipe].append((time.perf_counter() - began) * 1e3)
                    steps += 1
        finally:
            for runner in runners.values():
                runner.close()
    return {recipe: statistics.median(values) for recipe, values in times.items()}, steps


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
