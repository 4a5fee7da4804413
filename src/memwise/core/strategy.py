"""The strategy registry: how each Recipe field changes a model, a step and its optimizer.

Each technique lives in its own module under `memwise/strategies/` and registers a `Strategy`
here for the Recipe field it implements. The step runner asks the registry, never an if/elif
chain, so a new field is a new module. Registration happens when `memwise` is imported.
"""

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe

OptimizerBuilder = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class Handle:
    """Undoes what `apply_` did to a model: `remove()` restores it exactly.

    Strategies record undo actions with `on_remove` and share facts through `state`; tensors an
    optimizer keeps outside its `state` dict (fp32 master weights) go in `state["optimizer_owned"]`
    so memory accounting can see them.
    """

    def __init__(self, model: torch.nn.Module, recipe: Recipe) -> None:
        self.model = model
        self.recipe = recipe
        self.state: dict[str, Any] = {}
        self.notes: list[str] = []
        self._undo: list[Callable[[], None]] = []
        self.removed = False

    def on_remove(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def remove(self) -> None:
        """Restores the model's forward methods, hooks and parameter dtypes; safe to call twice."""
        while self._undo:
            self._undo.pop()()
        self.removed = True

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class Strategy:
    """One Recipe field's technique. Every hook is optional; the defaults do nothing.

    Attributes:
        field: the Recipe field this strategy implements.
        order: application order among strategies (lower first).
    """

    field: str = ""
    order: int = 100

    def patch_model(self, model: torch.nn.Module, recipe: Recipe, handle: Handle) -> None:
        """Changes the model in place, recording how to undo it on `handle`."""

    def forward_context(self, recipe: Recipe, device: torch.device, handle: Handle) -> contextlib.AbstractContextManager:
        """A context entered around each forward pass (and the loss)."""
        return contextlib.nullcontext()

    def wrap_optimizer(self, build: OptimizerBuilder, recipe: Recipe, handle: Handle) -> OptimizerBuilder:
        """Returns an optimizer builder that replaces or wraps `build`."""
        return build


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Adds `strategy` to the registry under its Recipe field."""
    if not strategy.field:
        raise ValueError("a Strategy must name the Recipe field it implements")
    STRATEGIES[strategy.field] = strategy
    return strategy


def strategies() -> list[Strategy]:
    return sorted(STRATEGIES.values(), key=lambda strategy: strategy.order)


def apply_(model: Any, recipe: Recipe) -> Handle:
    """Applies every strategy of `recipe` to `model` (or a Workload's model) in place.

    Returns:
        A Handle whose `remove()` restores the model exactly (forward methods, hooks, parameter
        dtypes and values as they were before).
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
    """Every strategy's forward context, nested in registry order."""
    with contextlib.ExitStack() as stack:
        for strategy in strategies():
            stack.enter_context(strategy.forward_context(recipe, device, handle))
        yield


def optimizer_builder(base: OptimizerBuilder, recipe: Recipe, handle: Handle) -> OptimizerBuilder:
    """`base` wrapped by every strategy that changes the optimizer, in registry order."""
    build = base
    for strategy in strategies():
        build = strategy.wrap_optimizer(build, recipe, handle)
    return build
