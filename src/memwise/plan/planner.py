"""`plan`: the fastest recipe that fits a memory budget, found on the estimator, confirmed by real steps.

The search runs over the joint space of `remedies.search_axes` (micro-batch with accumulation,
precision, checkpointing, optimizer-state precision and implementation, offload and allocator
settings for GPUs). Memory comes from `memwise.estimate` (cached per recipe); time from a
`StepTimeModel` calibrated on this machine. Candidates are visited fastest first; one that a
smaller, already-estimated candidate shows cannot fit is skipped without estimating it. The first
candidate that fits wins (objective `throughput`), or the smallest peak (objective `memory`); it is
then confirmed with `CONFIRM_STEPS` real steps under `memwise.profile`.

With `nproc` above one the budget is per rank: each strategy (DDP, FSDP2) is searched on its own
with `memwise.distributed.estimate_per_rank` (the effective batch is the global batch, the
micro-batch is per rank), its step time charged with the strategy's communication (see
`step_time.comm_ms`), and the faster feasible strategy wins. Such plans are not confirmed by real steps.
"""

import dataclasses
import enum
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

from memwise.core.checks import positive_int
from memwise.core.devices import DeviceSpec
from memwise.core.errors import BadInputError, SymbolicExecutionError
from memwise.core.recipe import Recipe
from memwise.core.serialize import from_dict, to_dict
from memwise.core.workload import Workload
from memwise.estimate.estimator import Estimate, estimate, resolve_device
from memwise.plan.fit import (
    DEFAULT_MARGIN,
    can_confirm,
    check_budget,
    confirm,
    predicted_bytes,
    predicted_fits,
)
from memwise.plan.input_sizing import DEFAULT_SAMPLES, InputSizing, LargestInput
from memwise.plan.remedies import (
    Candidate,
    candidates,
    describe,
    divisors,
    remedy_context,
    search_axes,
    uses_no_less_memory,
)
from memwise.plan.step_time import (
    StepTimeModel,
    calibrate_step_time,
    comm_bytes_per_pass,
    comm_ms,
    default_step_time_model,
    time_side_by_side,
)

MAX_CONFIRMATIONS = 2
MAX_FINALISTS = 3  # candidates timed side by side before the winner is confirmed (see Planner._race)
FINALIST_WINDOW = 2.0  # ... those the model predicts within this factor of its fastest fitting one
RACE_ROUNDS = 3
MAX_RACE_ESTIMATES = 8  # estimates a race may add to find its finalists
DEFAULT_MAX_ESTIMATES = 40


class PlanObjective(str, enum.Enum):
    """What the planner optimizes among the recipes that fit: step time, or peak memory."""

    THROUGHPUT = "throughput"
    MEMORY = "memory"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanAlternative:
    """One point of the memory/time frontier.

    Attributes:
        recipe: the candidate recipe.
        description: its non-default settings in words.
        predicted_peak_bytes: the estimator's figure compared with the budget.
        predicted_step_ms: the step-time model's prediction.
        fits: leaves the margin free within the budget.
        chosen: the plan's recipe.
    """

    recipe: Recipe
    description: str
    predicted_peak_bytes: int
    predicted_step_ms: float
    fits: bool
    chosen: bool
    strategy: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanReason:
    """Why a budget is infeasible: the smallest peak memwise reaches, its recipe, what dominates it."""

    message: str
    min_peak_bytes: int
    recipe: Recipe
    dominant_category: str
    dominant_bytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """The recipe to run under a memory budget. Frozen; round-trips through JSON.

    Attributes:
        feasible: a recipe fits (predicted with the margin, and confirmed when confirmation ran).
        budget_bytes: the budget planned for.
        recipe: the chosen recipe (when infeasible: the one with the smallest peak).
        predicted_peak_bytes: the estimator's figure for `recipe` (CPU: allocator peak; GPU:
            reserved + CUDA context).
        measured_peak_bytes: the same figure measured by real steps, None when not confirmed.
        predicted_step_ms: the step-time model's prediction for `recipe`.
        alternatives: the Pareto frontier of predicted memory against predicted time over the
            candidates estimated, fastest first.
        real_steps: real steps run to confirm (memory); calibration steps are in `calibration_steps`.
        reason: when infeasible, why.
        workload, device, objective, effective_batch_size: what was planned.
        sized_for: the input the plan was sized for.
        calibration_steps: real steps timed on this machine: to calibrate the step-time model, and to time the finalists side by side (`Planner._race`).
        estimates: estimator runs.
        notes: what the plan assumed or could not do.
        elapsed_s: wall time of planning.
        nproc: ranks planned for (the budget and the peaks are per rank when above one).
        strategy: `ddp` or `fsdp` when `nproc` is above one, else None.
    """

    feasible: bool
    budget_bytes: int
    recipe: Recipe
    predicted_peak_bytes: int
    measured_peak_bytes: int | None
    predicted_step_ms: float
    alternatives: tuple[PlanAlternative, ...]
    real_steps: int
    reason: PlanReason | None
    workload: str
    device: str
    objective: PlanObjective
    effective_batch_size: int
    sized_for: InputSizing
    calibration_steps: int
    estimates: int
    notes: tuple[str, ...]
    elapsed_s: float
    nproc: int = 1
    strategy: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        return from_dict(cls, data, where="plan")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Scored:
    candidate: Candidate
    estimate: Estimate
    step_ms: float


class Planner:
    """Plans one workload for one device, for any number of budgets, sharing estimates and timings.

    `memwise.plan` makes one per call; reuse a Planner to plan several budgets cheaply (estimates
    are cached per recipe, the step-time model is calibrated once).

    Args:
        workload: what to run (training steps).
        device: `cpu`, a GPU name from the catalog, or a DeviceSpec.
        effective_batch_size: samples per optimizer step every candidate keeps (default: the
            workload's `default_batch_size`).
        allow: restricts the search, by Recipe field, to the listed values (see `remedies.search_axes`).
        margin: the fraction of the budget a predicted peak must leave free.
        samples: draws of `make_batch` to find the largest input when the workload declares none.
        max_estimates: the most estimator runs one `plan()` may start.
        time_model: a ready StepTimeModel (skips calibration).
        nproc: ranks; above one, the budget is per rank and `strategy` must be `ddp` or `fsdp`.
        strategy: the distributed strategy of every candidate (only with nproc > 1).
    """

    def __init__(
        self,
        workload: Workload,
        device: str | DeviceSpec = "cpu",
        *,
        effective_batch_size: int | None = None,
        allow: Mapping[str, Sequence[Any]] | None = None,
        margin: float = DEFAULT_MARGIN,
        samples: int = DEFAULT_SAMPLES,
        max_estimates: int = DEFAULT_MAX_ESTIMATES,
        time_model: StepTimeModel | None = None,
        nproc: int = 1,
        strategy: str | None = None,
    ) -> None:
        if not isinstance(workload, Workload):
            raise BadInputError(f"workload: expected a memwise.Workload, got {type(workload).__name__}")
        check_budget(1, margin)
        positive_int(samples, "samples")
        positive_int(max_estimates, "max_estimates")
        batch = workload.default_batch_size if effective_batch_size is None else positive_int(effective_batch_size, "effective_batch_size")
        positive_int(nproc, "nproc")
        self.nproc = nproc
        self.strategy = _check_strategy(nproc, strategy)
        if batch % nproc:
            raise BadInputError(f"effective_batch_size: the global batch {batch} does not split evenly over nproc={nproc} ranks; "
                                f"use a multiple of {nproc}, e.g. {nproc * max(1, round(batch / nproc))}")
        self.workload = workload
        self.spec = resolve_device(device)
        self.margin = margin
        self.max_estimates = max_estimates
        self.inputs = LargestInput(workload, samples=samples)
        self.base = Recipe(batch_size=batch)
        context = remedy_context(self.base, train=True, gpu=self.spec.kind == "cuda",
                                 has_optimizer_factory=workload.optimizer_factory is not None)
        # micro-batches divide the per-rank batch; candidates keep the global batch (see rank_recipe)
        self.axes = search_axes(self.base.replace(batch_size=batch // nproc), context, allow=allow)
        self.notes: list[str] = []
        if nproc > 1 and _without_unsupported_precisions(self.axes) != self.axes:
            self.axes = _without_unsupported_precisions(self.axes)
            self.notes.append("bf16-weights was not searched: memwise's distributed runner cannot train with it yet "
                              "(its ranks fail on mixed bf16/fp32 matmuls)")
        self.candidates = list(candidates(self.base, self.axes))
        self.labels = {c.choice: [axis.values[i].label for axis, i in zip(self.axes, c.choice)] for c in self.candidates}
        self._estimates: dict[Recipe, Estimate | None] = {}
        self._estimate_count = 0
        self._time_model = time_model
        self._race_here = time_model is None  # a given model decides alone; one calibrated here is checked by timing finalists
        self._raced_ms: dict[Recipe, float] = {}  # the last race's median step times
        self._race_steps = 0
        self._order: list[Candidate] | None = None
        self._search_notes: list[str] = []

    @property
    def effective_batch_size(self) -> int:
        return self.base.batch_size

    # -- memory ---------------------------------------------------------------------------------

    def estimate(self, recipe: Recipe) -> Estimate | None:
        """The cached estimate of `recipe` on the largest input; None when this recipe cannot be estimated."""
        if recipe not in self._estimates:
            self._estimate_count += 1
            try:
                if self.nproc > 1:
                    from memwise.distributed.estimate import estimate_per_rank

                    self._estimates[recipe] = estimate_per_rank(self.inputs.workload, recipe, self.nproc, self.strategy, self.spec, what_if=False)
                else:
                    self._estimates[recipe] = estimate(self.inputs.workload, recipe, self.spec, what_if=False)
            except (SymbolicExecutionError, BadInputError, RuntimeError, TypeError, ValueError) as error:
                if not any(value is not None for value in self._estimates.values()):
                    raise  # nothing estimates: the workload's own error, reported as such
                self._estimates[recipe] = None
                self.notes.append(f"skipped {recipe_text(recipe)}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        return self._estimates[recipe]

    # -- time -----------------------------------------------------------------------------------

    def time_model(self) -> StepTimeModel:
        """The step-time model, calibrated on first use by timing real steps on this machine's CPU."""
        if self._time_model is None:
            micro = max(1, min(self.effective_batch_size // 4, 4))
            if self._can_run_here(micro):
                self._time_model = calibrate_step_time(self.inputs.workload, self.base, self.axes, micro_batch_size=micro)
            else:
                self._time_model = default_step_time_model(self.axes)
                self.notes.append("step times use default relative costs: the model is too large to time on this machine")
        return self._time_model

    def _can_run_here(self, micro: int, *, copies: int = 1) -> bool:
        params = list(self.workload.model.parameters())
        if any(param.is_meta for param in params):
            return False
        param_bytes = sum(param.numel() * param.element_size() for param in params)
        # per copy: parameters, gradients, two Adam moments and a small batch's activations, with room to spare
        return 8 * param_bytes * copies < 0.25 * psutil.virtual_memory().available

    def step_ms(self, candidate: Candidate) -> float:
        """Predicted step time of `candidate` in ms."""
        model = self.time_model()
        transfer = 0
        offload = candidate.recipe.offload.value
        if offload != "none":
            plain = self.estimate(self.base)
            categories = plain.by_category if plain is not None else {}
            if offload in ("optimizer", "all"):
                transfer += 2 * (categories.get("grad", 0) + categories.get("param", 0))
            if offload in ("activations", "all"):
                transfer += 2 * categories.get("activation", 0)
        if self.nproc == 1:
            return model.predict_ms(candidate.recipe, self.labels[candidate.choice], transfer_bytes=transfer)
        local = candidate.recipe.replace(batch_size=self.effective_batch_size // self.nproc)
        passes = local.batch_size // (local.micro_batch_size or local.batch_size)
        per_pass = comm_bytes_per_pass(self.strategy, self._trainable_bytes(candidate.recipe), self.nproc)
        return (model.predict_ms(local, self.labels[candidate.choice], transfer_bytes=transfer)
                + comm_ms(passes * per_pass, self.spec.kind))

    def _trainable_bytes(self, recipe: Recipe) -> int:
        """Bytes of the trainable parameters as the collectives move them (bf16 when the weights are)."""
        count = sum(p.numel() for p in {id(p): p for p in self.workload.model.parameters() if p.requires_grad}.values())
        return count * (2 if recipe.precision.value == "bf16-weights" else 4)

    # -- search ---------------------------------------------------------------------------------

    def smallest_candidates(self) -> list[Candidate]:
        """The candidates with the highest memory rank on every axis (one per incomparable mix)."""
        top = [max(value.memory_rank for value in axis.values) for axis in self.axes]
        return [
            c for c in self.candidates
            if all(axis.values[i].memory_rank == rank for axis, i, rank in zip(self.axes, c.choice, top))
        ]

    def plan(
        self, budget_bytes: int, objective: PlanObjective | str = PlanObjective.THROUGHPUT, *, confirm_steps: bool = True,
    ) -> Plan:
        """Plans for `budget_bytes` (see `memwise.plan`); `confirm_steps=False` skips the real steps."""
        started = time.perf_counter()
        check_budget(budget_bytes, self.margin)
        objective = _objective(objective)
        notes: list[str] = []
        self._search_notes = notes  # the search adds its own (e.g. the estimate cap) to this plan's notes
        if self.spec.kind == "cuda" and budget_bytes > self.spec.memory_bytes:
            notes.append(f"budget {budget_bytes} bytes is more than the {self.spec.name}'s {self.spec.memory_bytes}; planned for the device's capacity")
            budget_bytes = self.spec.memory_bytes
        count_before, race_steps_before = self._estimate_count, self._race_steps
        self._check_effective_batch(budget_bytes)
        time_model = self.time_model()
        smallest = [s for s in (self._score(c) for c in self.smallest_candidates()) if s is not None]
        if not smallest:
            raise BadInputError("plan: no candidate recipe could be estimated for this workload; see the notes of `memwise estimate`")
        floor = min(smallest, key=lambda s: (predicted_bytes(s.estimate), s.step_ms))

        def fits(scored: _Scored, scale: float) -> bool:
            # `scale` >= 1: after a failed confirmation, predictions are raised by the measured/predicted ratio
            return predicted_bytes(scored.estimate) * scale <= budget_bytes * (1 - self.margin)

        chosen: _Scored | None = None
        real_steps = 0
        measured = None
        scale = 1.0
        rejected: set[tuple[int, ...]] = set()
        for _ in range(MAX_CONFIRMATIONS):
            if not fits(floor, 1.0):
                break  # not even the smallest recipe fits: infeasible without searching further
            if objective == PlanObjective.MEMORY:
                options = [s for s in smallest if fits(s, scale) and s.candidate.choice not in rejected]
                chosen = min(options, key=lambda s: (predicted_bytes(s.estimate), s.step_ms)) if options else None
            else:
                open_to = lambda s, scale=scale: fits(s, scale) and s.candidate.choice not in rejected  # noqa: E731
                chosen = self._fastest_fitting(open_to, count_before)
                if chosen is not None and confirm_steps:
                    chosen = self._race(chosen, open_to, notes)
            if chosen is None or not confirm_steps or not can_confirm(self.spec) or self.nproc > 1:
                break
            confirmation = confirm(self.inputs.workload, chosen.candidate.recipe, self.spec, chosen.estimate)
            real_steps += confirmation.real_steps
            measured = confirmation.measured_bytes
            if measured is not None and measured <= budget_bytes:
                break
            notes.append(f"confirmation of {recipe_text(chosen.candidate.recipe)} failed: "
                         + (f"measured {measured} bytes > budget" if measured is not None else confirmation.note))
            rejected.add(chosen.candidate.choice)
            if measured is not None:
                scale = max(scale, measured / predicted_bytes(chosen.estimate))
            chosen, measured = None, None
        if chosen is not None and self.nproc > 1:
            notes.append(f"nothing was confirmed: plans for nproc={self.nproc} rest on the per-rank estimate "
                         f"(memwise.distributed.estimate_per_rank); check with `memwise profile --nproc {self.nproc} --strategy {self.strategy}`")
        elif chosen is not None and (not confirm_steps or not can_confirm(self.spec)):
            notes.append(f"nothing was confirmed: the plan rests on the estimate alone ({'confirmation off' if not confirm_steps else 'no ' + self.spec.name + ' on this machine'})")

        scored = [s for s in (self._scored_if_known(c) for c in self.candidates) if s is not None]
        winner = chosen or floor
        alternatives = _frontier(scored, winner, budget_bytes, self.margin, self.axes, self.strategy)
        reason = None if chosen is not None else self._reason(floor, budget_bytes, notes)
        calibration = time_model.measured_steps + self._race_steps - race_steps_before
        if time_model.calibrated:
            notes.append(f"step times from a model calibrated on {time_model.measured_steps} timed real steps on this machine's CPU"
                         + (" (relative only for a GPU target)" if self.spec.kind == "cuda" else ""))
        notes.append(self.inputs.sizing(winner.candidate.recipe.micro_batch_size or self.effective_batch_size).note)
        return Plan(
            feasible=chosen is not None,
            budget_bytes=budget_bytes,
            recipe=winner.candidate.recipe,
            predicted_peak_bytes=predicted_bytes(winner.estimate),
            measured_peak_bytes=measured if chosen is not None else None,
            predicted_step_ms=round(winner.step_ms, 3),
            alternatives=alternatives,
            real_steps=real_steps,
            reason=reason,
            workload=self.workload.name,
            device=self.spec.name,
            objective=objective,
            effective_batch_size=self.effective_batch_size,
            sized_for=self.inputs.sizing(winner.candidate.recipe.micro_batch_size or self.effective_batch_size),
            calibration_steps=calibration,
            estimates=self._estimate_count - count_before,
            notes=tuple(dict.fromkeys(self.notes + notes)),  # skipped recipes and timing defaults hold for every plan
            elapsed_s=round(time.perf_counter() - started, 3),
            nproc=self.nproc,
            strategy=self.strategy,
        )

    def _score(self, candidate: Candidate) -> _Scored | None:
        result = self.estimate(candidate.recipe)
        return None if result is None else _Scored(candidate=candidate, estimate=result, step_ms=self.step_ms(candidate))

    def _scored_if_known(self, candidate: Candidate) -> _Scored | None:
        result = self._estimates.get(candidate.recipe)
        return None if result is None else _Scored(candidate=candidate, estimate=result, step_ms=self.step_ms(candidate))

    def _fastest_fitting(self, fits: Any, count_before: int) -> _Scored | None:
        """Walks the candidates fastest first; skips those a smaller non-fitting candidate rules out."""
        order = self._undominated()
        too_large: list[tuple[int, ...]] = []
        for candidate in order:
            if any(uses_no_less_memory(self.axes, candidate.choice, small) for small in too_large):
                continue
            if candidate.recipe not in self._estimates and self._estimate_count - count_before >= self.max_estimates:
                self._search_notes.append(f"search stopped after {self.max_estimates} estimates; the plan is the fastest fitting recipe estimated")
                known = [s for s in (self._scored_if_known(c) for c in order) if s is not None and fits(s)]
                return min(known, key=lambda s: s.step_ms) if known else None
            scored = self._score(candidate)
            if scored is None:
                continue
            if fits(scored):
                return scored
            too_large.append(candidate.choice)
        return None

    def _race(self, chosen: _Scored, fits: Any, notes: list[str]) -> _Scored:
        """The fastest, timed side by side on this machine, of `chosen` and fitting candidates (at
        most `MAX_FINALISTS` in all, fastest predicted first): those the step-time model puts
        within `FINALIST_WINDOW` of it, and the fastest with a micro-batch size and checkpoint mode
        no finalist has yet.

        The model ranks the space; its error on a shared CPU (a pass's fixed cost, a recompute
        factor measured at a small batch) reached 40-70% on a busy 2-core machine, so the
        finalists are settled by measurement. Only where the plan's target is this machine's CPU
        with one process, and the finalists' models and optimizer states fit in memory side by side.
        """
        if not self._race_here or self.spec.kind != "cpu" or self.nproc > 1 or not self.time_model().calibrated:
            return chosen
        finalists = [chosen]
        new_estimates = 0
        for candidate in self._undominated():
            if len(finalists) >= MAX_FINALISTS:
                break
            if candidate.choice == chosen.candidate.choice:
                continue
            within = self.step_ms(candidate) <= chosen.step_ms * FINALIST_WINDOW
            # the model's least certain terms: a pass's fixed cost (micro-batching) and recompute
            # (checkpointing); a candidate with a mix of those no finalist has is raced whatever its prediction
            new_mix = self._uncertain_mix(candidate) not in {self._uncertain_mix(s.candidate) for s in finalists}
            if not (within or new_mix):
                continue
            if candidate.recipe not in self._estimates:
                if new_estimates >= MAX_RACE_ESTIMATES:
                    continue
                new_estimates += 1
            scored = self._score(candidate)
            if scored is not None and fits(scored):
                finalists.append(scored)
        if len(finalists) < 2 or not self._can_run_here(self.effective_batch_size, copies=len(finalists)):
            return chosen
        # all of them in one race, every time: timings from different moments of a shared machine do not compare
        self._raced_ms = time_side_by_side(self.inputs.workload, [s.candidate.recipe for s in finalists], RACE_ROUNDS)
        self._race_steps += len(finalists) * (1 + RACE_ROUNDS)
        fastest = min(finalists, key=lambda s: self._raced_ms[s.candidate.recipe])
        notes.append(f"{len(finalists)} finalists (within {FINALIST_WINDOW:g}x of the model's fastest, or another micro-batch "
                     "or checkpoint mix) timed side by side "
                     f"(median of {RACE_ROUNDS} interleaved steps): "
                     + "; ".join(f"{recipe_text(s.candidate.recipe)} {self._raced_ms[s.candidate.recipe]:.0f} ms" for s in finalists))
        return fastest

    def _uncertain_mix(self, candidate: Candidate) -> tuple[Any, ...]:
        """The candidate's micro-batch size and checkpoint mode: the choices the step-time model prices least surely."""
        return tuple(axis.values[i].label for axis, i in zip(self.axes, candidate.choice) if axis.name in ("micro_batch_size", "checkpoint"))

    def _undominated(self) -> list[Candidate]:
        """The candidates, fastest first, without those another is no slower and no larger than.

        A dominated candidate can never be the fastest that fits: whenever it fits, the one that
        dominates it fits too (memory is monotone along each axis) and is no slower.
        """
        if self._order is None:
            timed = sorted(((self.step_ms(c), c) for c in self.candidates), key=lambda item: (item[0], item[1].choice))
            kept: list[Candidate] = []
            for step_ms, candidate in timed:
                # every candidate already kept is no slower; drop this one if one of them needs no more memory
                if not any(uses_no_less_memory(self.axes, candidate.choice, other.choice) for other in kept):
                    kept.append(candidate)
            self._order = kept
        return self._order

    def _check_effective_batch(self, budget_bytes: int) -> None:
        """Rejects an effective batch that only single-sample micro-batches divide while larger ones fit.

        A prime effective batch N splits only into N passes of one sample or one pass of N; when the
        pass of N cannot fit but passes of 2 or more could, the user is better served by a nearby
        effective batch than by a plan that runs one sample at a time.
        """
        batch = self.effective_batch_size
        if batch <= 2 or len(divisors(batch)) > 2:
            return
        smallest = self.smallest_candidates()

        def fits_whole(size: int) -> bool:
            results = [self.estimate(c.recipe.replace(batch_size=size, micro_batch_size=None)) for c in smallest]
            return any(r is not None and predicted_fits(r, budget_bytes, self.margin) for r in results)

        if fits_whole(batch) or not fits_whole(2):
            return
        low, high = 2, batch - 1  # low fits whole; find the largest that does
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits_whole(middle) else (low, middle - 1)
        nearby = sorted({value for value in range(max(2, batch - low), batch + low + 1)
                         if value != batch and any(value % m == 0 for m in range(2, low + 1))},
                        key=lambda value: (abs(value - batch), value))[:4]
        raise BadInputError(
            f"effective_batch_size: {batch} is divided only by micro-batches of 1 and {batch}; {batch} does not fit the budget "
            f"but micro-batches up to {low} do; divisors of {batch} that work: 1 ({batch} passes of one sample); "
            f"effective batch sizes near {batch} that split into fitting micro-batches: {', '.join(map(str, nearby))}"
        )

    def _reason(self, floor: _Scored, budget_bytes: int, notes: list[str]) -> PlanReason:
        categories = floor.estimate.by_category
        dominant, dominant_bytes = max(categories.items(), key=lambda item: item[1]) if categories else ("unknown", 0)
        peak = predicted_bytes(floor.estimate)
        failed = [note for note in notes if note.startswith("confirmation")]
        if failed and peak <= budget_bytes * (1 - self.margin):
            message = f"the recipes that fit on the estimate did not fit in real steps ({failed[-1]})"
        else:
            message = (f"the smallest peak memwise reaches is {peak} bytes ({recipe_text(floor.candidate.recipe)}), "
                       f"above the budget of {budget_bytes} bytes less the {self.margin:.0%} margin; "
                       f"it is dominated by {dominant} ({dominant_bytes} bytes, {dominant_bytes / max(peak, 1):.0%})")
        return PlanReason(message=message, min_peak_bytes=peak, recipe=floor.candidate.recipe,
                          dominant_category=dominant, dominant_bytes=dominant_bytes)


STRATEGIES = ("ddp", "fsdp")
# Precisions memwise's distributed runner (torchrun ranks) cannot train with.
UNSUPPORTED_DISTRIBUTED_PRECISIONS = ("bf16-weights",)


def _without_unsupported_precisions(axes: tuple[Any, ...]) -> tuple[Any, ...]:
    """The axes without precisions that distributed ranks cannot run; an error if none is left."""
    kept = []
    for axis in axes:
        if axis.name == "precision":
            axis = dataclasses.replace(axis, values=tuple(v for v in axis.values if v.label not in UNSUPPORTED_DISTRIBUTED_PRECISIONS))
            if not axis.values:
                raise BadInputError(f"allow: with nproc above 1 precision must allow a value other than "
                                    f"{', '.join(UNSUPPORTED_DISTRIBUTED_PRECISIONS)} (e.g. fp32 or bf16)")
        kept.append(axis)
    return tuple(kept)


def _check_strategy(nproc: int, strategy: str | None) -> str | None:
    """The strategy of a Planner: None for one process, `ddp` or `fsdp` for several."""
    if nproc == 1:
        if strategy not in (None, "auto"):
            raise BadInputError(f"strategy: {strategy!r} needs nproc above 1 (got nproc=1); omit it or raise nproc")
        return None
    value = getattr(strategy, "value", strategy)
    if value not in STRATEGIES:
        raise BadInputError(f"strategy: invalid value {strategy!r} for nproc={nproc}; valid values are ddp, fsdp")
    return value


def _strategies(nproc: int, strategy: str | None) -> list[str | None]:
    """The strategies `plan` searches: one fixed, or both when `auto`/None with several ranks."""
    positive_int(nproc, "nproc")
    value = getattr(strategy, "value", strategy)
    if nproc == 1:
        _check_strategy(1, value)
        return [None]
    if value in (None, "auto"):
        return list(STRATEGIES)
    return [_check_strategy(nproc, value)]


def _best_of(plans: list[Plan], objective: PlanObjective, notes: list[str]) -> Plan:
    """The plan to return among one per strategy: the fastest feasible (or smallest for `memory`),
    else the infeasible one with the smallest reachable peak; the frontiers are merged."""
    feasible = [p for p in plans if p.feasible]
    if feasible:
        key = (lambda p: (p.predicted_step_ms, p.predicted_peak_bytes)) if objective == PlanObjective.THROUGHPUT \
            else (lambda p: (p.predicted_peak_bytes, p.predicted_step_ms))
        best = min(feasible, key=key)
    else:
        best = min(plans, key=lambda p: (p.reason.min_peak_bytes if p.reason else p.predicted_peak_bytes))
    for other in plans:
        if other is not best:
            verdict = (f"fastest fitting recipe {recipe_text(other.recipe)}, predicted {other.predicted_peak_bytes} bytes per rank, "
                       f"{other.predicted_step_ms} ms" if other.feasible else f"infeasible (smallest peak {other.reason.min_peak_bytes} bytes per rank)"
                       if other.reason else "infeasible")
            notes.append(f"{other.strategy} considered: {verdict}")
    merged = [alt for p in plans for alt in p.alternatives]
    frontier: list[PlanAlternative] = []
    smallest_so_far = math.inf
    for alt in sorted(merged, key=lambda a: (a.predicted_step_ms, a.predicted_peak_bytes)):
        keep = alt.chosen and alt.strategy == best.strategy
        if alt.predicted_peak_bytes < smallest_so_far or keep:
            frontier.append(dataclasses.replace(alt, chosen=keep))
            smallest_so_far = min(smallest_so_far, alt.predicted_peak_bytes)
    return dataclasses.replace(best, alternatives=tuple(frontier), notes=tuple(dict.fromkeys(best.notes + tuple(notes))),
                               estimates=sum(p.estimates for p in plans), elapsed_s=round(sum(p.elapsed_s for p in plans), 3))


def _objective(objective: PlanObjective | str) -> PlanObjective:
    try:
        return PlanObjective(objective)
    except ValueError:
        raise BadInputError(f"objective: invalid value {objective!r}; valid values are throughput, memory") from None


def _frontier(scored: list[_Scored], winner: _Scored, budget_bytes: int, margin: float, axes: Any,
              strategy: str | None = None) -> tuple[PlanAlternative, ...]:
    """The candidates no other is both faster and smaller than (fastest first), plus the winner."""
    frontier: list[_Scored] = []
    smallest_so_far = math.inf
    for item in sorted(scored, key=lambda s: (s.step_ms, predicted_bytes(s.estimate))):
        if predicted_bytes(item.estimate) < smallest_so_far:
            frontier.append(item)
            smallest_so_far = predicted_bytes(item.estimate)
    if all(item.candidate.choice != winner.candidate.choice for item in frontier):
        frontier.append(winner)
        frontier.sort(key=lambda s: s.step_ms)
    return tuple(
        PlanAlternative(
            recipe=item.candidate.recipe, description=describe(axes, item.candidate.choice),
            predicted_peak_bytes=predicted_bytes(item.estimate), predicted_step_ms=round(item.step_ms, 3),
            fits=predicted_fits(item.estimate, budget_bytes, margin), chosen=item.candidate.choice == winner.candidate.choice,
            strategy=strategy,
        )
        for item in frontier
    )


def recipe_text(recipe: Recipe) -> str:
    """The recipe's fields that differ from the defaults, e.g. 'batch_size=8, micro_batch_size=2, checkpoint=full'."""
    default = Recipe()
    parts = []
    for field in dataclasses.fields(Recipe):
        value = getattr(recipe, field.name)
        if value != getattr(default, field.name):
            parts.append(f"{field.name}={getattr(value, 'value', value)}")
    return ", ".join(parts) or "defaults"


def plan(
    workload: Workload,
    budget_bytes: int,
    device: str | DeviceSpec = "cpu",
    effective_batch_size: int | None = None,
    objective: PlanObjective | str = PlanObjective.THROUGHPUT,
    allow: Mapping[str, Sequence[Any]] | None = None,
    *,
    margin: float = DEFAULT_MARGIN,
    nproc: int = 1,
    strategy: str | None = None,
) -> Plan:
    """The fastest training recipe of `workload` whose peak fits `budget_bytes` on `device`.

    Searches precision, checkpointing (full, selective, every 2nd block), micro-batching with
    gradient accumulation (every divisor of the effective batch), optimizer-state precision and
    implementation, and for GPU targets offload and allocator settings, jointly, on the estimator;
    ranks them with a step-time model calibrated from real steps timed on this machine; confirms the
    winner with at most two real steps (`memwise.profile`) and falls back to the next candidate if
    the measured peak exceeds the budget.

    Args:
        workload: what to train.
        budget_bytes: the memory budget in bytes (CPU: the allocator's peak, parameters included;
            GPU: what the process needs on the device, CUDA context included).
        device: `cpu` or a GPU from the catalog (`memwise devices`).
        effective_batch_size: samples per optimizer step, kept by every candidate (default: the
            workload's `default_batch_size`).
        objective: `throughput` (fastest recipe that fits) or `memory` (smallest peak).
        allow: restricts the search by Recipe field, e.g. `{"precision": ["fp32"]}`.
        margin: fraction of the budget a prediction must leave free (5%).
        nproc: ranks (data parallel). Above one, `budget_bytes` is per rank, `effective_batch_size`
            is the global batch (a multiple of `nproc`), micro-batches are per rank, and each
            strategy is estimated with `memwise.distributed.estimate_per_rank`.
        strategy: `ddp`, `fsdp`, or `auto`/None (search both) when `nproc` is above one.

    Returns:
        A `Plan`; `feasible` is False with a `reason` when nothing fits.

    Assumptions:
        Peak memory is monotone along each remedy (a smaller micro-batch or more checkpointing never
        needs more); the relative cost of each remedy measured at a small batch holds at the planned one.

    Known limitations:
        For a GPU target on a machine without one, nothing is confirmed and step times are relative
        (calibrated on this CPU). Inference plans are not searched (training steps only). With
        nproc > 1 nothing is confirmed by real steps and communication time is modelled from
        stated bandwidths (see `step_time.comm_ms`), not measured.
    """
    strategies = _strategies(nproc, strategy)
    objective = _objective(objective)
    plans: list[Plan] = []
    notes: list[str] = []
    time_model = None
    for each in strategies:
        planner = Planner(workload, device, effective_batch_size=effective_batch_size, allow=allow, margin=margin,
                          nproc=nproc, strategy=each, time_model=time_model)
        try:
            plans.append(planner.plan(budget_bytes, objective))
        except BadInputError as error:
            if len(strategies) == 1 or "effective_batch_size" in str(error):
                raise
            notes.append(f"{each} skipped: {str(error).splitlines()[0][:200]}")
        time_model = planner.time_model()  # calibrated once, shared by the strategies
    if not plans:
        raise BadInputError(f"strategy: no strategy could be planned for nproc={nproc}: " + "; ".join(notes))
    return plans[0] if len(strategies) == 1 else _best_of(plans, objective, notes)

