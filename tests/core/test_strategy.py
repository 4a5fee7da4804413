"""The strategy contract: one ordered list, typed effects, the four things a strategy may change,
notes shown in every result, process-wide settings restored on `remove()`."""

import dataclasses
import importlib
import json

import pytest
import torch

import memwise
import memwise.strategies
from memwise.core import strategy as strategy_module
from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe
from memwise.core.step import StepRunner
from memwise.report.html import render_html
from memwise.report.tables import render_markdown
from memwise.strategies.master_weights import MasterWeightsOptimizer
from memwise.strategies.optimizer_state import LowPrecisionAdam


def test_the_list_is_the_registry_and_names_recipe_fields():
    fields = [s.field for s in strategy_module.strategies()]
    assert strategy_module.strategies() == memwise.strategies.STRATEGIES
    assert len(fields) == len(set(fields))
    assert set(fields) <= {f.name for f in dataclasses.fields(Recipe)}
    assert strategy_module.strategy_for("precision") is memwise.strategies.STRATEGIES[fields.index("precision")]
    with pytest.raises(KeyError, match="batch_size"):
        strategy_module.strategy_for("batch_size")


def test_importing_a_strategy_module_registers_nothing():
    before = strategy_module.strategies()
    importlib.reload(importlib.import_module("memwise.strategies.checkpoint"))
    assert strategy_module.strategies() == before
    assert not hasattr(strategy_module, "register") and not hasattr(strategy_module.Strategy, "order")


def test_order_makes_low_precision_state_the_innermost_optimizer(tiny_workload):
    # bf16 weights wrap the optimizer in fp32 masters; optimizer_state replaces the base Adam. In
    # the list's order the masters' optimizer is the LowPrecisionAdam: neither change is lost.
    recipe = Recipe(batch_size=4, precision="bf16-weights", optimizer="adamw", optimizer_state="bf16")
    runner = StepRunner(tiny_workload, recipe, "train", tiny_workload.model, torch.device("cpu"))
    try:
        assert isinstance(runner.optimizer, MasterWeightsOptimizer)
        assert isinstance(runner.optimizer.inner, LowPrecisionAdam)
        effects = runner.handle.effects
        assert isinstance(effects, strategy_module.StrategyEffects)
        assert [param.dtype for param, _ in effects.master_weights] == [torch.bfloat16] * 4
        assert {id(t) for t in effects.optimizer_owned} == {id(master) for _, master in runner.optimizer.pairs}
        assert all(t.dtype == torch.float32 for t in effects.optimizer_owned)
    finally:
        runner.close()
    assert all(param.dtype == torch.float32 for param in tiny_workload.model.parameters())


class _CountSaved(strategy_module.Strategy):
    """A newcomer's strategy: it only uses `saved_tensors_hooks`, and the runner honours it."""

    field = "sdpa_backend"  # any Recipe field: this test swaps it in for the attention strategy

    def __init__(self) -> None:
        self.packed = 0

    def saved_tensors_hooks(self, recipe, device, handle):
        def pack(tensor):
            self.packed += 1
            return tensor

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def test_a_new_strategy_is_one_entry_in_the_list(monkeypatch, tiny_workload):
    counting = _CountSaved()
    replaced = tuple(counting if s.field == "sdpa_backend" else s for s in memwise.strategies.STRATEGIES)
    monkeypatch.setattr(memwise.strategies, "STRATEGIES", replaced)
    strategy_module._strategies.cache_clear()
    try:
        runner = StepRunner(tiny_workload, Recipe(batch_size=4), "train", tiny_workload.model, torch.device("cpu"))
        runner.step()
        runner.close()
    finally:
        strategy_module._strategies.cache_clear()
    assert counting.packed > 0  # linear layers save their inputs for backward


def test_notes_are_in_every_result(tiny_workload):
    recipe = Recipe(batch_size=4, allocator="expandable_segments:True")
    if torch.cuda.is_available():
        pytest.skip("on CUDA the allocator settings apply and the note differs")
    note = "allocator settings 'expandable_segments:True' apply to CUDA only: ignored on this CPU"
    profile = memwise.profile(tiny_workload, recipe, steps=1)
    estimate = memwise.estimate(tiny_workload, recipe, "cpu")
    trained = memwise.train(tiny_workload, recipe, steps=1)
    for result in (profile, estimate, trained):
        assert result.notes == (note,)
        assert json.loads(json.dumps(result.to_dict()))["notes"] == [note]
        assert type(result).from_dict(result.to_dict()).notes == (note,)
    assert "## Notes\n\n- allocator settings 'expandable\\_segments:True' apply to CUDA only" in render_markdown(profile)
    assert f"<h2>Notes</h2>\n<ul><li>{note.replace(chr(39), '&#x27;')}</li></ul>" in render_html(estimate, None)
    assert memwise.profile(tiny_workload, Recipe(batch_size=4), steps=1).notes == ()


def test_allocator_settings_are_restored_on_remove(monkeypatch):
    # Process-wide state: the setting survives the model, so remove() must put it back. The
    # settings API is the same on a CPU build, so pretend CUDA is there to exercise it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from memwise.strategies.allocator import allocator_settings, set_allocator_settings

    original = allocator_settings()
    set_allocator_settings("max_split_size_mb:256")
    try:
        handle = memwise.apply_(torch.nn.Linear(2, 2), Recipe(allocator="expandable_segments:True,garbage_collection_threshold:0.6"))
        assert allocator_settings() == "expandable_segments:True,garbage_collection_threshold:0.6"
        assert handle.notes == ["CUDA allocator settings applied for this run (restored afterwards): "
                                "expandable_segments:True,garbage_collection_threshold:0.6"]
        handle.remove()
        assert allocator_settings() == "max_split_size_mb:256,expandable_segments:False"
        handle.remove()  # twice is harmless
        assert allocator_settings() == "max_split_size_mb:256,expandable_segments:False"
    finally:
        set_allocator_settings(original)


def test_failed_apply_restores_what_was_applied(monkeypatch):
    # allocator is applied first; a later strategy failing must still undo it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from memwise.strategies.allocator import allocator_settings, set_allocator_settings

    original = allocator_settings()
    try:
        set_allocator_settings("")
        model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        with pytest.raises(BadInputError, match="checkpoint_modules"):
            memwise.apply_(model, Recipe(allocator="max_split_size_mb:64", checkpoint="selective", checkpoint_modules=("nope",)))
        assert allocator_settings() == ""
    finally:
        set_allocator_settings(original)


def test_forward_contexts_nest_in_list_order():
    recipe = Recipe(batch_size=1, precision="bf16")
    handle = memwise.apply_(torch.nn.Linear(2, 2), recipe)
    with strategy_module.forward_context(recipe, torch.device("cpu"), handle):
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    handle.remove()
