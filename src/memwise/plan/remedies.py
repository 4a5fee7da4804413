"""The remedies memwise knows: which Recipe fields can change to save memory, and how they combine.

One place defines them for both users: `estimate` asks `what_if_candidates` for its what-if rows
(one remedy at a time), and the planner searches `search_axes` jointly (every combination). Both
are pure transformations of a `Recipe`; nothing here runs a model, so this module depends on
`core/` only, and `estimate/` may import it lazily without a cycle (see docs/plan.md).

Each axis lists its values with a memory rank: a higher rank never needs more memory than a lower
one *on that axis, all else equal* (full checkpointing never keeps more than none); values with the
same rank are not comparable (selective vs every_n, the three precisions). The planner uses the
ranks to skip candidates that a smaller one already showed do not fit.
"""

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from memwise.core.errors import BadInputError
from memwise.core.recipe import (
    CheckpointMode,
    OffloadMode,
    OptimizerName,
    OptimizerStateDtype,
    Precision,
    Recipe,
)

EXPANDABLE_SEGMENTS = "expandable_segments:True"
# Fields the planner may change, in the order they appear in a candidate's description.
SEARCH_FIELDS = ("micro_batch_size", "precision", "checkpoint", "optimizer", "offload", "allocator")
_RECIPE_FIELDS = {field.name for field in dataclasses.fields(Recipe)}
HAS_OPTIMIZER_IMPL = "optimizer_impl" in _RECIPE_FIELDS


@dataclasses.dataclass(frozen=True, kw_only=True)
class RemedyContext:
    """What decides which remedies apply to a workload.

    Attributes:
        train: the step trains (checkpointing, micro-batching and optimizer remedies apply).
        gpu: the target is a CUDA device (offload and allocator settings apply).
        adam: the optimizer is Adam/AdamW built by memwise (its moments can be shrunk).
        builtin_optimizer: memwise builds the optimizer (the recipe names one, or the workload has
            no factory), so its implementation can be chosen.
    """

    train: bool
    gpu: bool
    adam: bool
    builtin_optimizer: bool


def remedy_context(recipe: Recipe, *, train: bool, gpu: bool, has_optimizer_factory: bool) -> RemedyContext:
    """The context of `recipe` for a workload (with or without its own optimizer factory)."""
    builtin = recipe.optimizer is not None or not has_optimizer_factory
    adam = recipe.optimizer in (OptimizerName.ADAM, OptimizerName.ADAMW) or (recipe.optimizer is None and not has_optimizer_factory)
    return RemedyContext(train=train, gpu=gpu, adam=adam, builtin_optimizer=builtin)


# ---------------------------------------------------------------------------------------------
# Single remedies: the what-if rows of `estimate`.


@dataclasses.dataclass(frozen=True, kw_only=True)
class WhatIfCandidate:
    """One remedy applied alone to the estimated recipe.

    Exactly one of `recipe` (re-estimate this recipe) and `analytic_peak_bytes` (derived from the
    current estimate's categories, for remedies memwise cannot run) is set.
    """

    change: str
    recipe: Recipe | None = None
    analytic_peak_bytes: int | None = None


def what_if_candidates(
    recipe: Recipe, context: RemedyContext, *, peak_bytes: int, by_category: Mapping[str, int],
) -> tuple[WhatIfCandidate, ...]:
    """The remedies that apply to `recipe` one at a time, for `estimate`'s what-if rows.

    Args:
        recipe: the estimated recipe (batch_size set).
        context: see `RemedyContext`.
        peak_bytes: the estimate's peak.
        by_category: the estimate's bytes by category at the peak.

    Returns:
        Candidates in a fixed order: batch halved, micro-batch halved, bf16, checkpointing,
        optimizer-state precision, offload (GPU), layers on host.
    """
    rows: list[WhatIfCandidate] = []
    if recipe.batch_size > 1:
        half = recipe.batch_size // 2
        rows.append(WhatIfCandidate(change=f"batch size halved ({recipe.batch_size} -> {half})",
                                    recipe=recipe.replace(batch_size=half, micro_batch_size=None)))
        micro = recipe.micro_batch_size or recipe.batch_size
        if context.train and micro % 2 == 0:
            rows.append(WhatIfCandidate(change=f"micro-batch {micro // 2}, same effective batch {recipe.batch_size}",
                                        recipe=recipe.replace(micro_batch_size=micro // 2)))
    if recipe.precision == Precision.FP32:
        rows.append(WhatIfCandidate(change="bf16 autocast", recipe=recipe.replace(precision=Precision.BF16)))
    if context.train and recipe.checkpoint == CheckpointMode.NONE:
        rows.append(WhatIfCandidate(change="full activation checkpointing", recipe=recipe.replace(checkpoint=CheckpointMode.FULL)))
        rows.append(WhatIfCandidate(change="selective activation checkpointing", recipe=recipe.replace(checkpoint=CheckpointMode.SELECTIVE)))
    state = by_category.get("optimizer_state", 0)
    if context.train and state and recipe.optimizer_state == OptimizerStateDtype.FP32:
        for dtype, factor in ((OptimizerStateDtype.BF16, 2), (OptimizerStateDtype.INT8, 4)):
            change = f"{dtype.value} optimizer state"
            if context.adam:
                rows.append(WhatIfCandidate(change=change, recipe=_with_state(recipe, dtype)))
            else:
                rows.append(WhatIfCandidate(change=change, analytic_peak_bytes=peak_bytes - state + state // factor))
    if context.gpu and context.train and recipe.offload == OffloadMode.NONE:
        rows.append(WhatIfCandidate(change="optimizer state offloaded to host", recipe=recipe.replace(offload=OffloadMode.OPTIMIZER)))
        rows.append(WhatIfCandidate(change="saved activations offloaded to host", recipe=recipe.replace(offload=OffloadMode.ACTIVATIONS)))
    resident = sum(by_category.get(category, 0) for category in ("param", "grad", "optimizer_state"))
    if resident:
        rows.append(WhatIfCandidate(change="half of the layers kept on host (weights, grads, state)",
                                    analytic_peak_bytes=peak_bytes - resident // 2))
    return tuple(rows)


def _with_state(recipe: Recipe, dtype: OptimizerStateDtype) -> Recipe:
    # a low-precision state runs memwise's own Adam, so an implementation choice no longer applies
    changes: dict[str, Any] = {"optimizer_state": dtype}
    if HAS_OPTIMIZER_IMPL and dtype != OptimizerStateDtype.FP32:
        changes["optimizer_impl"] = None
    return recipe.replace(**changes)


# ---------------------------------------------------------------------------------------------
# Joint search space: the planner's axes.


@dataclasses.dataclass(frozen=True, kw_only=True)
class AxisValue:
    """One setting of an axis: the Recipe fields it sets, a label, and its memory rank."""

    label: str
    fields: tuple[tuple[str, Any], ...]
    memory_rank: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Axis:
    """A knob of the search: its name (one of `SEARCH_FIELDS`) and its values."""

    name: str
    values: tuple[AxisValue, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """A point of the joint space: one value per axis (by index) and the recipe they make."""

    choice: tuple[int, ...]
    recipe: Recipe


def divisors(number: int) -> list[int]:
    """The positive divisors of `number`, ascending."""
    return [value for value in range(1, number + 1) if number % value == 0]


def search_axes(
    base: Recipe, context: RemedyContext, *, allow: Mapping[str, Sequence[Any]] | None = None,
) -> tuple[Axis, ...]:
    """The planner's axes for `base` (batch_size set): every remedy that applies, with its values.

    Args:
        base: the recipe to start from; its `batch_size` is the effective batch kept by every candidate.
        context: see `RemedyContext`.
        allow: restricts an axis to the listed values, by Recipe field name (`precision`,
            `checkpoint`, `micro_batch_size`, `optimizer_state`, `optimizer_impl`, `offload`,
            `allocator`), e.g. `{"precision": ["fp32"]}` keeps the numerics unchanged.

    Returns:
        Axes in `SEARCH_FIELDS` order; an axis that does not apply has the base's value only.
    """
    allowed = _check_allow(allow)
    batch = base.batch_size
    micro_values = divisors(batch) if context.train else [batch]
    axes = [Axis(name="micro_batch_size", values=tuple(
        AxisValue(label=f"micro-batch {micro}" if micro != batch else f"batch {batch}",
                  fields=(("micro_batch_size", None if micro == batch else micro),), memory_rank=batch - micro)
        for micro in sorted(micro_values, reverse=True) if _allowed(allowed, "micro_batch_size", micro)
    ))]
    precisions = [Precision.FP32, Precision.BF16, Precision.BF16_WEIGHTS] + ([Precision.FP16] if context.gpu else [])
    axes.append(Axis(name="precision", values=tuple(
        AxisValue(label=precision.value, fields=(("precision", precision),), memory_rank=0)
        for precision in precisions if _allowed(allowed, "precision", precision)
    )))
    checkpoints = ((CheckpointMode.NONE, 0), (CheckpointMode.EVERY_N, 1), (CheckpointMode.SELECTIVE, 1), (CheckpointMode.FULL, 2))
    axes.append(Axis(name="checkpoint", values=tuple(
        AxisValue(label=f"checkpoint {mode.value}", fields=(("checkpoint", mode),), memory_rank=rank)
        for mode, rank in checkpoints if (context.train or mode == CheckpointMode.NONE) and _allowed(allowed, "checkpoint", mode)
    )))
    axes.append(Axis(name="optimizer", values=tuple(_optimizer_values(context, allowed))))
    offloads = ((OffloadMode.NONE, 0), (OffloadMode.OPTIMIZER, 1), (OffloadMode.ACTIVATIONS, 1), (OffloadMode.ALL, 2))
    axes.append(Axis(name="offload", values=tuple(
        AxisValue(label=f"offload {mode.value}", fields=(("offload", mode),), memory_rank=rank)
        for mode, rank in offloads if (context.gpu and context.train or mode == OffloadMode.NONE) and _allowed(allowed, "offload", mode)
    )))
    allocators = (("", 0), (EXPANDABLE_SEGMENTS, 1)) if context.gpu else (("", 0),)
    axes.append(Axis(name="allocator", values=tuple(
        AxisValue(label=f"allocator {conf or 'default'}", fields=(("allocator", conf),), memory_rank=rank)
        for conf, rank in allocators if _allowed(allowed, "allocator", conf)
    )))
    empty = [axis.name for axis in axes if not axis.values]
    if empty:
        raise BadInputError(f"allow: leaves no value for {empty[0]}; allow at least one value that applies to this workload")
    return tuple(axes)


def _optimizer_values(context: RemedyContext, allowed: dict[str, set[Any]]) -> Iterator[AxisValue]:
    # (state, implementation) is one axis: an implementation choice applies to fp32 moments only.
    # Rank: foreach keeps parameter-sized temporaries for all tensors at once (0); fused and
    # for-loop work one tensor at a time (1); bf16 moments (2) and 8-bit moments (3) shrink the state.
    impls: list[tuple[Any, int]] = [(None, 1)]
    if HAS_OPTIMIZER_IMPL and context.train and context.builtin_optimizer:
        from memwise.core.recipe import OptimizerImpl

        impls = [(OptimizerImpl.FOREACH, 0), (OptimizerImpl.FUSED, 1), (OptimizerImpl.FOR_LOOP, 1)]
    states = [(OptimizerStateDtype.FP32, 0)]
    if context.train and context.adam:
        states += [(OptimizerStateDtype.BF16, 2), (OptimizerStateDtype.INT8, 3)]
    for state, state_rank in states:
        if not _allowed(allowed, "optimizer_state", state):
            continue
        for impl, impl_rank in impls if state == OptimizerStateDtype.FP32 else [(None, 0)]:
            if impl is not None and not _allowed(allowed, "optimizer_impl", impl):
                continue
            fields: tuple[tuple[str, Any], ...] = (("optimizer_state", state),)
            if HAS_OPTIMIZER_IMPL:
                fields += (("optimizer_impl", impl),)
            label = f"optimizer state {state.value}" + (f", {impl.value}" if impl is not None else "")
            yield AxisValue(label=label, fields=fields, memory_rank=state_rank if state_rank else impl_rank)



def _check_allow(allow: Mapping[str, Sequence[Any]] | None) -> dict[str, set[Any]]:
    if allow is None:
        return {}
    if not isinstance(allow, Mapping):
        raise BadInputError(f"allow: expected a mapping of Recipe field to allowed values, got {type(allow).__name__}")
    valid = ["micro_batch_size", "precision", "checkpoint", "optimizer_state", "offload", "allocator"]
    valid += ["optimizer_impl"] if HAS_OPTIMIZER_IMPL else []
    allowed: dict[str, set[Any]] = {}
    for name, values in allow.items():
        if name not in valid:
            raise BadInputError(f"allow: unknown field {name!r}; valid fields are {', '.join(valid)}")
        if isinstance(values, (str, int)) or not isinstance(values, (list, tuple, set, frozenset)):
            raise BadInputError(f"allow[{name!r}]: expected a list of values, got {values!r}")
        # validate through Recipe itself, so the message lists the valid values
        coerced = set()
        for value in values:
            probe = Recipe(**{name: value}) if name != "micro_batch_size" else Recipe(batch_size=value, micro_batch_size=value)
            coerced.add(getattr(probe, name))
        allowed[name] = coerced
    return allowed


def _allowed(allowed: dict[str, set[Any]], name: str, value: Any) -> bool:
    return name not in allowed or value in allowed[name]


def candidates(base: Recipe, axes: Sequence[Axis]) -> Iterator[Candidate]:
    """Every combination of the axes' values applied to `base` (the joint space)."""
    sizes = [len(axis.values) for axis in axes]

    def walk(prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        if len(prefix) == len(sizes):
            yield prefix
            return
        for index in range(sizes[len(prefix)]):
            yield from walk(prefix + (index,))

    for choice in walk(()):
        changes: dict[str, Any] = {}
        for axis, index in zip(axes, choice):
            changes.update(axis.values[index].fields)
        yield Candidate(choice=choice, recipe=base.replace(**changes))


def uses_no_less_memory(axes: Sequence[Axis], larger: tuple[int, ...], smaller: tuple[int, ...]) -> bool:
    """True when candidate `larger` is, axis by axis, equal to `smaller` or a lower memory rank.

    If `smaller` does not fit a budget, neither does `larger` (memory is monotone along each axis).
    """
    for axis, a, b in zip(axes, larger, smaller):
        if a == b:
            continue
        rank_a, rank_b = axis.values[a].memory_rank, axis.values[b].memory_rank
        if rank_a >= rank_b:
            return False
    return True


def describe(axes: Sequence[Axis], choice: tuple[int, ...]) -> str:
    """A short text of a candidate's non-default settings, e.g. 'micro-batch 4, bf16, checkpoint full'."""
    parts = []
    for position, (axis, index) in enumerate(zip(axes, choice)):
        value = axis.values[index]
        default = value.fields[0][1] in (None, "", Precision.FP32, CheckpointMode.NONE, OffloadMode.NONE)
        if position == 0 or not default or axis.name == "optimizer" and value.label != "optimizer state fp32":
            parts.append(value.label)
    return ", ".join(parts)
