"""`WatchSession`: what every framework adapter does (apply a plan, watch steps, write the report)."""

import json
import os
from pathlib import Path
from typing import Any

import torch

from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe
from memwise.core.strategy import Handle, apply_
from memwise.measure.watch import Watch, WatchResult, user_site
from memwise.report.output import write_report

PlanLike = Recipe | dict[str, Any] | str | os.PathLike[str] | None


def load_plan(plan: PlanLike) -> Recipe | None:
    """A Recipe from a Recipe, its dict, or a JSON file holding a Recipe (or a plan with a `recipe` key)."""
    if plan is None or isinstance(plan, Recipe):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        path = Path(plan)
        try:
            plan = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadInputError(f"plan: cannot read {str(path)!r} as JSON ({error}); pass a Recipe JSON file") from None
    if not isinstance(plan, dict):
        raise BadInputError(f"plan: expected a Recipe, a dict or a JSON file path, got {type(plan).__name__}")
    if isinstance(plan.get("recipe"), dict):  # a saved plan: use the recipe it chose
        plan = plan["recipe"]
    return Recipe.from_dict(plan)


class WatchSession:
    """Applies an optional plan to the model, watches its steps and writes the report.

    Args:
        out_dir: where to write watch.json, timeline.png and report.html (None: write nothing).
        steps: watch this many optimizer steps, then let training go on unwatched (None: all).
        plan: a Recipe (or its JSON file) to apply with `memwise.apply_` before training; only the
            model-side strategies apply (e.g. checkpointing, bf16 weights): the framework keeps its
            own optimizer and autocast.

    Attributes:
        result: the `WatchResult` once the watch ended, else None.
        handle: the `Handle` of the applied plan (call `handle.remove()` to undo it), else None.
        paths: the report files written, by kind.
    """

    def __init__(self, out_dir: str | os.PathLike[str] | None = None, steps: int | None = None, plan: PlanLike = None) -> None:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise BadInputError(f"steps: must be a positive integer or None, got {steps!r}")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.steps = steps
        self.plan = load_plan(plan)
        self.result: WatchResult | None = None
        self.handle: Handle | None = None
        self.paths: dict[str, Path] = {}
        self.watch: Watch | None = None
        self.write = True

    def begin(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *, write: bool = True) -> None:
        """Applies the plan and starts watching `model` (`write=False` on non-main processes)."""
        if self.watch is not None:
            return
        self.write = write
        if self.plan is not None:
            self.handle = apply_(model, self.plan)
        self.watch = Watch(model, optimizer, self.steps, on_finish=self._finished)
        self.watch.start(user_site(2))

    def end(self) -> None:
        """Stops watching (when `steps` has not already) and writes the report."""
        if self.watch is not None:
            self.watch.finish()

    def _finished(self, watch: Watch) -> None:
        if watch.steps_done == 0:
            return
        self.result = watch.result()
        if self.out_dir is not None and self.write:
            self.paths = write_report(self.result, self.out_dir, stem="watch")
