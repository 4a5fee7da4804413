"""The contract between a strategy (one Recipe field's technique) and the step runner.

A strategy may change exactly four things, each through one method of `Strategy`:

- the model (`patch_model`: in place, with its undo recorded on the `Handle`),
- the optimizer (`wrap_optimizer`: returns a builder that replaces or wraps the base one),
- the context of forward and loss (`forward_context`: autocast, an attention-kernel choice),
- the tensors saved for backward (`saved_tensors_hooks`: pack/unpack hooks, e.g. to host memory).

What the step runner and memory accounting must know about their effects is typed, in
`Handle.effects` (`StrategyEffects`); what a user should be told is in `Handle.notes`, which every
result shows. The strategies and their order are one explicit list, `memwise.strategies.STRATEGIES`,
read here when first needed: importing a strategy module registers nothing.
"""

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe

OptimizerBuilder = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclasses.dataclass
class StrategyEffects:
    """What the applied strategies did that the step runner and memory accounting must know.

    Attributes:
        master_weights: `precision=bf16-weights`: each parameter now stored in bf16 and its fp32
            original, which the optimizer builder turns into that parameter's master copy.
        optimizer_owned: tensors an optimizer keeps outside its `state` dict (fp32 master weights,
            host copies for offload); memory accounting counts them as `optimizer_state`.
    """

    master_weights: list[tuple[torch.nn.Parameter, torch.Tensor]] = dataclasses.field(default_factory=list)
    optimizer_owned: list[torch.Tensor] = dataclasses.field(default_factory=list)


class Handle:
    """Undoes what `apply_` did to a model: `remove()` restores it exactly.

    Attributes:
        model: the module the strategies changed.
        recipe: the recipe applied.
        effects: what the strategies did that a step runner must account for.
        notes: sentences for the user (e.g. a setting that does nothing on this device); every
            result (Profile, Estimate, TrainResult) carries them as `notes`.
    """

    def __init__(self, model: torch.nn.Module, recipe: Recipe) -> None:
        self.model = model
        self.recipe = recipe
        self.effects = StrategyEffects()
        self.notes: list[str] = []
        self._undo: list[Callable[[], None]] = []
        self.removed = False

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Records `undo`, run by `remove()` (last recorded, first run)."""
        self._undo.append(undo)

    def remove(self) -> None:
        """Restores the model (forward methods, hooks, parameter dtypes) and process-wide settings; safe to call twice."""
        while self._undo:
            self._undo.pop()()
        self.removed = True

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class Strategy:
    """One Recipe field's technique. Every method is optional; the defaults change nothing.

    Attributes:
        field: the Recipe field this strategy implements.
    """

    field: str = ""

    def patch_model(self, model: torch.nn.Module, recipe: Recipe, handle: Handle) -> None:
        """Changes the model in place, recording how to undo it with `handle.on_remove`."""

    def wrap_optimizer(self, build: OptimizerBuilder, recipe: Recipe, handle: Handle) -> OptimizerBuilder:
        """Returns an optimizer builder that replaces or wraps `build`."""
        return build

    def forward_context(self, recipe: Recipe, device: torch.device, handle: Handle) -> contextlib.AbstractContextManager:
        """A context entered around each forward pass and its loss (autocast, kernel choice)."""
        return contextlib.nullcontext()

    def saved_tensors_hooks(self, recipe: Recipe, device: torch.device, handle: Handle) -> contextlib.AbstractContextManager:
        """A `torch.autograd.graph.saved_tensors_hooks` context for forward, or a null context."""
        return contextlib.nullcontext()


def strategies() -> tuple[Strategy, ...]:
    """Every strategy, in the order they are applied (see `memwise.strategies.STRATEGIES`)."""
    return _strategies()


@functools.cache
def _strategies() -> tuple[Strategy, ...]:
    # Imported here, not at the top: core does not depend on the strategies at import time, and
    # the list is read once, when the first step is set up.
    from memwise.strategies import STRATEGIES

    fields = [strategy.field for strategy in STRATEGIES]
    duplicated = sorted({field for field in fields if fields.count(field) > 1})
    missing = [field for field in fields if field not in {f.name for f in dataclasses.fields(Recipe)}]
    if duplicated or missing:
        raise ValueError(f"memwise.strategies.STRATEGIES: fields {duplicated or missing} are duplicated or not Recipe fields")
    return tuple(STRATEGIES)


def strategy_for(field: str) -> Strategy:
    """The strategy that implements the Recipe field `field`."""
    for strategy in strategies():
        if strategy.field == field:
            return strategy
    raise KeyError(f"no strategy implements Recipe field {field!r}; fields with one: {', '.join(s.field for s in strategies())}")


def apply_(model: Any, recipe: Recipe) -> Handle:
    """Applies every strategy of `recipe` to `model` (or a Workload's model) in place.

    Returns:
        A Handle whose `remove()` restores the model exactly (forward methods, hooks, parameter
        dtypes and values as they were before) and any process-wide setting a strategy changed.
    """
    module = getattr(model, "model", model)
    if not isinstance(module, torch.nn.Module):
        raise BadInputError(f"apply_: expected a torch.nn.Module or a Workload, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise BadInputError(f"apply_: expected a memwise.Recipe, got {type(recipe).__name__}")
    handle = Handle(module, recipe)
    try:
        for strategy in strategies():
            strategy.patch_model(module, recipe, handle)
    except BaseException:
        handle.remove()
        raise
    return handle


@contextlib.contextmanager
def forward_context(recipe: Recipe, device: torch.device, handle: Handle):
    """Every strategy's forward context, then every strategy's saved-tensor hooks, nested in list order."""
    with contextlib.ExitStack() as stack:
        for strategy in strategies():
            stack.enter_context(strategy.forward_context(recipe, device, handle))
        for strategy in strategies():
            stack.enter_context(strategy.saved_tensors_hooks(recipe, device, handle))
        yield


def optimizer_builder(base: OptimizerBuilder, recipe: Recipe, handle: Handle) -> OptimizerBuilder:
    """`base` wrapped by every strategy that changes the optimizer, in list order (the first is innermost)."""
    build = base
    for strategy in strategies():
        build = strategy.wrap_optimizer(build, recipe, handle)
    return build
