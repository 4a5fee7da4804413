"""The remedies: one list, used by estimate's what-ifs and the planner's joint search."""

import pytest

from memwise.core.errors import BadInputError
from memwise.core.recipe import CheckpointMode, OffloadMode, OptimizerStateDtype, Precision, Recipe
from memwise.plan.remedies import (
    RemedyContext,
    candidates,
    divisors,
    search_axes,
    uses_no_less_memory,
    what_if_candidates,
)

CPU_ADAM = RemedyContext(train=True, gpu=False, adam=True, builtin_optimizer=True)
GPU_ADAM = RemedyContext(train=True, gpu=True, adam=True, builtin_optimizer=True)


def test_what_if_rows_are_single_remedies_in_a_fixed_order():
    recipe = Recipe(batch_size=8)
    rows = what_if_candidates(recipe, CPU_ADAM, peak_bytes=1000, by_category={"param": 100, "grad": 100, "optimizer_state": 200})
    changes = [row.change for row in rows]
    assert changes == [
        "batch size halved (8 -> 4)", "micro-batch 4, same effective batch 8", "bf16 autocast",
        "full activation checkpointing", "selective activation checkpointing", "bf16 optimizer state",
        "8bit optimizer state", "half of the layers kept on host (weights, grads, state)",
    ]
    assert rows[1].recipe.batch_size == 8 and rows[1].recipe.micro_batch_size == 4
    assert rows[5].recipe.optimizer_state == OptimizerStateDtype.BF16
    assert rows[-1].recipe is None and rows[-1].analytic_peak_bytes == 1000 - 400 // 2


def test_what_if_without_adam_derives_the_state_rows_and_gpu_adds_offload():
    rows = what_if_candidates(Recipe(batch_size=1), RemedyContext(train=True, gpu=True, adam=False, builtin_optimizer=False),
                              peak_bytes=1000, by_category={"optimizer_state": 400})
    by_change = {row.change: row for row in rows}
    assert by_change["bf16 optimizer state"].analytic_peak_bytes == 1000 - 400 + 200
    assert by_change["8bit optimizer state"].analytic_peak_bytes == 1000 - 400 + 100
    assert by_change["optimizer state offloaded to host"].recipe.offload == OffloadMode.OPTIMIZER
    assert not any(change.startswith("batch size halved") for change in by_change)  # batch 1 cannot halve


def test_axes_keep_the_effective_batch_and_cover_every_remedy():
    base = Recipe(batch_size=12)
    axes = search_axes(base, CPU_ADAM)
    names = [axis.name for axis in axes]
    assert names == ["micro_batch_size", "precision", "checkpoint", "optimizer", "offload", "allocator"]
    recipes = [candidate.recipe for candidate in candidates(base, axes)]
    assert {r.micro_batch_size or r.batch_size for r in recipes} == set(divisors(12)) == {1, 2, 3, 4, 6, 12}
    assert all(r.batch_size == 12 for r in recipes)
    assert {r.checkpoint for r in recipes} == set(CheckpointMode)
    assert {r.precision for r in recipes} == {Precision.FP32, Precision.BF16, Precision.BF16_WEIGHTS}  # fp16 only on GPUs
    assert {r.offload for r in recipes} == {OffloadMode.NONE}  # offload is a no-op on the CPU
    gpu_recipes = [c.recipe for c in candidates(base, search_axes(base, GPU_ADAM))]
    assert {r.offload for r in gpu_recipes} == set(OffloadMode)
    assert {r.allocator for r in gpu_recipes} == {"", "expandable_segments:True"}


def test_allow_restricts_axes_and_rejects_unknown_fields_and_values():
    axes = search_axes(Recipe(batch_size=4), CPU_ADAM, allow={"precision": ["fp32"], "checkpoint": ["none", "full"]})
    recipes = [c.recipe for c in candidates(Recipe(batch_size=4), axes)]
    assert {r.precision for r in recipes} == {Precision.FP32}
    assert {r.checkpoint for r in recipes} == {CheckpointMode.NONE, CheckpointMode.FULL}
    with pytest.raises(BadInputError, match="allow: unknown field 'colour'"):
        search_axes(Recipe(batch_size=4), CPU_ADAM, allow={"colour": ["red"]})
    with pytest.raises(BadInputError, match="precision: invalid value 'fp8'"):
        search_axes(Recipe(batch_size=4), CPU_ADAM, allow={"precision": ["fp8"]})
    with pytest.raises(BadInputError, match="leaves no value for micro_batch_size"):
        search_axes(Recipe(batch_size=4), CPU_ADAM, allow={"micro_batch_size": [3]})


def test_memory_order_only_compares_ordered_values():
    base = Recipe(batch_size=4)
    axes = search_axes(base, CPU_ADAM, allow={"optimizer_state": ["fp32"], "optimizer_impl": ["fused"]} if _has_impl() else {"optimizer_state": ["fp32"]})
    by_recipe = {(c.recipe.micro_batch_size or 4, c.recipe.precision, c.recipe.checkpoint): c.choice for c in candidates(base, axes)}
    plain = by_recipe[(4, Precision.FP32, CheckpointMode.NONE)]
    smaller = by_recipe[(2, Precision.FP32, CheckpointMode.FULL)]
    selective = by_recipe[(4, Precision.FP32, CheckpointMode.SELECTIVE)]
    every_n = by_recipe[(4, Precision.FP32, CheckpointMode.EVERY_N)]
    bf16 = by_recipe[(2, Precision.BF16, CheckpointMode.FULL)]
    assert uses_no_less_memory(axes, plain, smaller) and not uses_no_less_memory(axes, smaller, plain)
    assert not uses_no_less_memory(axes, selective, every_n) and not uses_no_less_memory(axes, every_n, selective)
    assert not uses_no_less_memory(axes, plain, bf16)  # precisions are not ordered: bf16 autocast can need more


def _has_impl() -> bool:
    from memwise.plan.remedies import HAS_OPTIMIZER_IMPL

    return HAS_OPTIMIZER_IMPL
