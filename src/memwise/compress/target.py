"""`CompressTarget`: the trained model to compress, its metric, and the inputs to run it on.

Built from a Workload. A training workload's batch `(inputs, labels)` is split: the model is
called on `inputs` alone (as at inference) and the labels serve distillation's hard-label loss.
An inference workload (`extras["mode"] == "infer"`) is called on its whole batch.
"""

import copy
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memwise.core.errors import BadInputError
from memwise.core.workload import Workload

# How far above chance the original metric must be for the model to count as trained.
TRAINED_MARGIN = 0.05
# How far above the same model re-initialised its metric must be (absolute, and relative to that metric).
REINIT_MARGIN = 0.1
REINIT_RELATIVE_MARGIN = 0.25


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressTarget:
    """What a compression search needs.

    Attributes:
        name: the workload's name.
        model: the trained model (eval mode; the search never modifies it).
        evaluate: `evaluate(model) -> float`, higher is better.
        make_labeled: `make_labeled(batch_size) -> (inputs, labels or None)`.
    """

    name: str
    model: nn.Module
    evaluate: Callable[[nn.Module], float]
    make_labeled: Callable[[int], tuple[Any, torch.Tensor | None]]

    def inputs(self, batch_size: int) -> Any:
        return self.make_labeled(batch_size)[0]


def target_from_workload(workload: Workload, *, weights: str | os.PathLike[str] | None = None) -> CompressTarget:
    """The trained model of `workload` with its metric and inputs.

    The model is, in order: the workload's model with `weights` (a state dict file) loaded; the
    model `workload.extras["trained_model"]()` returns (digits-cnn: trained on first use and cached
    on disk); the workload's own model.

    Raises:
        BadInputError: the workload has no `evaluate`; `weights` cannot be read or does not fit
            the model; the workload says its model is untrained (`extras["trained"] is False`),
            or the model scores at chance level (`extras["chance_metric"]`).
    """
    if workload.evaluate is None:
        raise BadInputError(
            f"workload {workload.name!r} has no evaluate: compression needs a metric to guard. Pass "
            "Workload(..., evaluate=fn) where fn(model) returns a float where higher is better "
            "(e.g. held-out accuracy) from your workload function"
        )
    if weights is not None:
        model = copy.deepcopy(workload.model)
        model.load_state_dict(_read_state_dict(weights, model))
    elif "trained_model" in workload.extras:
        model = workload.extras["trained_model"]()
    elif workload.extras.get("trained") is False:
        raise BadInputError(
            f"workload {workload.name!r}: its model is untrained; compressing it would measure nothing. "
            "Pass --weights FILE (a state dict of the trained model)"
        )
    else:
        model = workload.model
    model.eval()
    chance = workload.extras.get("chance_metric")
    if chance is not None:
        metric = float(workload.evaluate(model))
        if metric <= float(chance) + TRAINED_MARGIN:
            raise BadInputError(
                f"workload {workload.name!r}: the model scores {metric:.3f}, at chance level ({float(chance):.3f}); "
                "it looks untrained. Pass --weights FILE with the state dict of a trained model"
            )
    _refuse_untrained(workload.name, model, workload.evaluate)
    mode = workload.extras.get("mode")

    def make_labeled(batch_size: int) -> tuple[Any, torch.Tensor | None]:
        batch = workload.make_batch(batch_size)
        if mode != "infer" and isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], torch.Tensor):
            return batch[0], batch[1]
        return batch, None

    return CompressTarget(name=workload.name, model=model, evaluate=workload.evaluate, make_labeled=make_labeled)


def _refuse_untrained(name: str, model: nn.Module, evaluate: Callable[[nn.Module], float]) -> None:
    """Refuses a model whose metric is not clearly better than the same model freshly initialised.

    A copy has `reset_parameters()` called on every module that has one (seed 0, the caller's RNG
    state untouched) and is evaluated once; the model must beat it by more than
    `max(REINIT_MARGIN, REINIT_RELATIVE_MARGIN * |re-initialised metric|)`: two random
    initialisations differ by noise (a random 10-class net scores 0.05 to 0.2 on a small set), a
    trained model by far more.
    """
    fresh = copy.deepcopy(model)
    resettable = [module for module in fresh.modules() if callable(getattr(module, "reset_parameters", None))]
    if not resettable:
        return
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        for module in resettable:
            module.reset_parameters()
    fresh.eval()
    metric = float(evaluate(model))
    baseline = float(evaluate(fresh))
    margin = max(REINIT_MARGIN, REINIT_RELATIVE_MARGIN * abs(baseline))
    if not metric > baseline + margin:
        raise BadInputError(
            f"workload {name!r}: the model scores {metric:.4g}, not clearly better than the same model with its parameters "
            f"re-initialised ({baseline:.4g}; it must beat that by more than {margin:.3g}); it looks untrained. "
            "Pass --weights FILE with the state dict of the trained model, or train it first"
        )


def _read_state_dict(weights: str | os.PathLike[str], model: nn.Module) -> dict[str, torch.Tensor]:
    path = Path(weights)
    if not path.is_file():
        raise BadInputError(f"--weights: {str(path)!r} does not exist; give a file saved with torch.save(model.state_dict(), FILE)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BadInputError(f"--weights: {str(path)!r} is not a state dict torch.load can read with weights_only=True ({type(error).__name__})") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BadInputError(f"--weights: {str(path)!r} holds a {type(state).__name__}, expected a state dict (torch.save(model.state_dict(), FILE))")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(key for key in set(expected) & set(state) if tuple(expected[key].shape) != tuple(state[key].shape))
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else "") + (f" unexpected {unexpected[:3]}" if unexpected else "")
        detail += f" wrong shape {wrong[:3]}" if wrong else ""
        raise BadInputError(f"--weights: {str(path)!r} does not fit the workload's model:{detail.rstrip()}")
    return state
