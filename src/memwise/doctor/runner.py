"""Running a workload, or a user's script, under `watch` and returning what it found.

A script runs as `python train.py --its --args` would run it (`runpy`, `__main__`, `sys.argv`),
with two additions: a `SiteRecorder` notes the source line of every allocation from the first line
(so weights made before training still have their line), and `torch.optim.Optimizer.__init__` is
wrapped so the first optimizer the script makes starts a `Watch` over the module that holds its
parameters. After `steps` optimizer steps the script is stopped.
"""

import contextlib
import copy
import dataclasses
import gc
import os
import runpy
import sys
import traceback
from typing import Any

import torch

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError, MemwiseError
from memwise.core.recipe import Mode, Recipe
from memwise.core.step import StepRunner, resolve_recipe, run_device
from memwise.core.workload import Workload
from memwise.doctor.hazards import Hazard
from memwise.measure.watch import SiteRecorder, Watch, WatchResult, user_site

DEFAULT_STEPS = 6


class ScriptError(MemwiseError):
    """The user's script raised before memwise saw its first step (the message is the script's error)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Diagnosis:
    """What the doctor found.

    Attributes:
        target: the workload spec or the script's path.
        result: the watched steps (`WatchResult`), whose `hazards` are the findings.
        script_error: the script's own error when it failed after its first watched step, else None.
    """

    target: str
    result: WatchResult
    script_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "target": self.target,
            "steps": self.result.steps,
            "peak_bytes": self.result.peak_bytes,
            "hazards": [hazard_json(hazard) for hazard in self.result.hazards],
            "script_error": self.script_error,
        }


def hazard_json(hazard: Hazard) -> dict[str, Any]:
    """`{kind, bytes, steps, location: {file, line}, fix, message}`: the doctor's JSON for one hazard."""
    return {
        "kind": hazard.kind, "bytes": hazard.bytes, "steps": list(hazard.steps),
        "location": {"file": hazard.location.file, "line": hazard.location.line},
        "fix": hazard.fix, "message": hazard.message,
    }


def diagnose_workload(
    workload: Workload, recipe: Recipe | None = None, *, steps: int = DEFAULT_STEPS, mode: Mode | str = Mode.TRAIN,
    device: str | torch.device = "cpu",
) -> Diagnosis:
    """Runs `steps` steps of `workload` (on a deep copy of its model) under `watch`.

    Returns:
        A `Diagnosis` whose `result.hazards` lists what was found (empty for a clean loop).
    """
    positive_int(steps, "steps")
    if mode not in {m.value for m in Mode} | set(Mode):
        raise BadInputError(f"mode: invalid value {mode!r}; valid values are train, infer")
    mode, device = Mode(mode), run_device(device)
    recipe = resolve_recipe(workload, recipe)
    model = copy.deepcopy(workload.model).to(device)
    runner = StepRunner(workload, recipe, mode, model, device)
    try:
        with Watch(model, runner.optimizer) as watched:
            for _ in range(steps):
                runner.step()
                if mode == Mode.INFER:
                    watched.step()
    finally:
        runner.close()
    return Diagnosis(target=workload.name, result=watched.result())


class _StopScript(BaseException):
    """Raised from the optimizer hook once enough steps are watched (a BaseException, so a script's
    `except Exception` does not swallow it)."""


def diagnose_script(path: str | os.PathLike[str], args: tuple[str, ...] = (), *, steps: int = DEFAULT_STEPS) -> Diagnosis:
    """Runs the Python script at `path` with `args` under `watch` for `steps` optimizer steps.

    Raises:
        BadInputError: `path` is not a readable file, the script never made an optimizer or never
            stepped it (the message says how to mark steps), or its model is on a device memwise
            cannot measure.
        ScriptError: the script raised before its first step (the message is its own error and line).
    """
    positive_int(steps, "steps")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadInputError(f"script: {path!r} is not a file; pass a Python script (train.py) or a workload spec")
    gc.collect()  # garbage from earlier runs in this process must not pass for the script's tensors
    recorder = SiteRecorder()
    state: dict[str, Watch | None] = {"watch": None}
    original_init = torch.optim.Optimizer.__init__

    def stop(watched: Watch) -> None:
        if watched.steps_done >= steps:
            raise _StopScript()

    def init(optimizer: torch.optim.Optimizer, *init_args: Any, **init_kwargs: Any) -> None:
        original_init(optimizer, *init_args, **init_kwargs)
        if state["watch"] is None:
            watched = Watch(_model_of(optimizer), optimizer, steps, site_recorder=recorder, on_finish=stop)
            state["watch"] = watched
            watched.start(user_site(2))

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    torch.optim.Optimizer.__init__ = init
    script_error = None
    try:
        with recorder:
            runpy.run_path(path, run_name="__main__")
    except _StopScript:
        pass
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            script_error = f"the script exited with status {exit_.code}"
    except BadInputError:
        raise
    except Exception as error:  # the script's own failure
        script_error = _describe(error, path)
    finally:
        torch.optim.Optimizer.__init__ = original_init
        sys.argv, sys.path[:] = saved_argv, saved_path
        watched = state["watch"]
        if watched is not None:
            with contextlib.suppress(_StopScript):
                watched.finish()
    if watched is None or watched.steps_done == 0:
        if script_error is not None:
            raise ScriptError(f"{path} failed before its first step: {script_error}")
        if watched is None:
            raise BadInputError(
                f"script: {path} made no torch.optim optimizer, so memwise saw no step; run a loop with an optimizer, "
                "or wrap your loop in `with memwise.watch(model) as w:`, call `w.step()` at the end of each step and "
                "run the script directly"
            )
        raise BadInputError(
            f"script: {path} made an optimizer but never called optimizer.step(), so memwise saw no step; "
            "wrap your loop in `with memwise.watch(model) as w:` and call `w.step()` at the end of each step"
        )
    return Diagnosis(target=path, result=watched.result(), script_error=script_error)


def _model_of(optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """The largest live module holding any of `optimizer`'s parameters (the model being trained)."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    best, best_count = None, 0
    for obj in gc.get_objects():  # modules are few among the objects; only they are looked at
        if not issubclass(type(obj), torch.nn.Module):
            continue
        params = list(obj.parameters())
        if any(id(p) in ids for p in params) and len(params) > best_count:
            best, best_count = obj, len(params)
    if best is None:
        raise BadInputError("script: the optimizer's parameters belong to no torch.nn.Module; memwise watches a module's steps")
    return best


def _describe(error: BaseException, path: str) -> str:
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if "/memwise/" not in frame.filename]
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"
