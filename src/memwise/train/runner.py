"""`train`: run training steps, and when a step runs out of memory, shrink the micro-batch and redo it.

On an OOM the step's gradients are dropped, the micro-batch is halved and the number of
accumulation passes doubled, so the effective batch stays what the user asked for, and the same
step is redone on the same samples: none is skipped, none is seen twice. (Accelerate's
`find_executable_batch_size` changes the effective batch instead; Lightning's batch-size finder
settles on a size that only just fits.)
"""

import dataclasses
import gc
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError, MemwiseError
from memwise.core.recipe import Mode, Recipe
from memwise.core.serialize import from_dict, to_dict
from memwise.core.step import StepRunner, resolve_recipe
from memwise.core.workload import Workload, move_batch
from memwise.measure.budget_guard import BudgetGuard
from memwise.measure.tracker import persistent_tensors
from memwise.train.checkpoint_io import load_checkpoint, save_checkpoint

LogCallback = Callable[[dict[str, Any]], None]


class TrainingStoppedError(MemwiseError):
    """Training cannot go on (the micro-batch cannot shrink further); the last checkpoint is kept."""


class InfeasibleBudgetError(MemwiseError):
    """The budget is below what the model needs before any activation (CLI exit code 3)."""

    def __init__(self, message: str, minimum_bytes: int) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class OomEvent:
    """One recovery: at `step` the micro-batch went from `micro_batch_size_before` to `..._after`."""

    step: int
    micro_batch_size_before: int
    micro_batch_size_after: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepMemory:
    """Memory of one finished step: tensors live after it, and the peak during it (reserved on CUDA)."""

    step: int
    allocated_bytes: int
    peak_bytes: int
    reserved_bytes: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a training run did.

    Attributes:
        steps_done: optimizer steps completed (including those before a resume).
        oom_events: every recovery from running out of memory.
        final_recipe: the recipe at the end (its micro_batch_size after any recovery).
        peak_bytes: the highest peak over the run's steps (tracked tensors; CUDA: max allocated).
        loss_history: the loss of every step, in order.
        memory: per step, bytes allocated after it and its peak.
    """

    steps_done: int
    oom_events: tuple[OomEvent, ...]
    final_recipe: Recipe
    peak_bytes: int
    loss_history: tuple[float, ...]
    memory: tuple[StepMemory, ...]
    notes: tuple[str, ...] = ()  # what the recipe's strategies said about the run (Handle.notes)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainResult":
        return from_dict(cls, data, where="train result")


def smaller_micro_batch(micro_batch_size: int) -> int | None:
    """The next micro-batch size after an OOM: half (or divided by its smallest prime factor), None at 1.

    Any divisor of the micro-batch also divides the effective batch, so accumulation stays exact.
    """
    if micro_batch_size <= 1:
        return None
    factor = next(f for f in range(2, micro_batch_size + 1) if micro_batch_size % f == 0)
    return micro_batch_size // factor


def train(
    workload: Workload,
    recipe: Recipe | None = None,
    steps: int = 10,
    *,
    budget_bytes: int | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    device: str | torch.device = "cpu",
    log: LogCallback | None = None,
) -> TrainResult:
    """Trains `workload.model` in place for `steps` optimizer steps, recovering from OOM.

    Args:
        workload: what to train; its model is updated in place.
        recipe: how to run a step; `micro_batch_size` is where recovery starts.
        steps: optimizer steps to reach (counting those done before a resume).
        budget_bytes: a memory budget. On CPU (and on CUDA too) a guard raises
            `torch.OutOfMemoryError` when live tensor bytes exceed it; without a budget only a
            real CUDA OOM triggers recovery.
        checkpoint_dir: where to write `memwise-train.pt` (atomically) every `checkpoint_every` steps
            and at the end.
        resume: continue from the checkpoint in `checkpoint_dir`. The batches of the steps already
            done are drawn again from `make_batch` and dropped, so a deterministic `make_batch`
            gives the resumed run the same samples as an uninterrupted one.
        device: `cpu` or `cuda`.
        log: called with a dict per finished step and per OOM event.

    Returns:
        A TrainResult.

    Raises:
        InfeasibleBudgetError: the budget is below the parameters, buffers and gradients alone.
        TrainingStoppedError: a micro-batch of 1 still does not fit.
    """
    positive_int(steps, "steps")
    positive_int(checkpoint_every, "checkpoint_every")
    if resume and checkpoint_dir is None:
        raise BadInputError("resume: needs a checkpoint directory (--checkpoint-dir)")
    recipe = resolve_recipe(workload, recipe)
    if recipe.micro_batch_size is None:
        recipe = recipe.replace(micro_batch_size=recipe.batch_size)
    device = torch.device(device)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    log = log or (lambda record: None)
    model = workload.model.to(device)

    state = _State(recipe=recipe)
    if resume:
        state = _restore(load_checkpoint(directory), model)
    phase = {"now": "idle"}
    runner = StepRunner(workload, state.recipe, Mode.TRAIN, model, device, on_phase=lambda name: phase.__setitem__("now", name))
    _check_budget(runner, budget_bytes)
    if resume:
        runner.optimizer.load_state_dict(state.optimizer_state)
        for _ in range(state.steps_done):  # advance make_batch to where the interrupted run stopped
            workload.make_batch(state.recipe.batch_size)
    guard = BudgetGuard(budget_bytes)
    guard.track([tensor for tensor, _, _ in persistent_tensors(model, runner.handle.effects.optimizer_owned)])
    try:
        while state.steps_done < steps:
            step = state.steps_done
            batch = move_batch(workload.make_batch(state.recipe.batch_size), device)
            guard.track(batch)
            loss = _step_with_recovery(runner, batch, guard, state, step, log, device, phase)
            del batch
            guard.track(list(_optimizer_tensors(runner.optimizer)))
            state.loss_history.append(loss)
            state.steps_done += 1
            state.memory.append(_step_memory(step, guard, device))
            log({"event": "step", "step": step, "loss": loss, "micro_batch_size": state.recipe.micro_batch_size,
                 "allocated_bytes": state.memory[-1].allocated_bytes, "peak_bytes": state.memory[-1].peak_bytes})
            if directory is not None and (state.steps_done % checkpoint_every == 0 or state.steps_done == steps):
                save_checkpoint(directory, state.payload(model, runner.optimizer))
    finally:
        runner.close()
    return TrainResult(
        steps_done=state.steps_done,
        oom_events=tuple(state.oom_events),
        final_recipe=state.recipe,
        peak_bytes=max((m.peak_bytes for m in state.memory), default=0),
        loss_history=tuple(state.loss_history),
        memory=tuple(state.memory),
        notes=tuple(runner.handle.notes),
    )


@dataclasses.dataclass
class _State:
    recipe: Recipe
    steps_done: int = 0
    loss_history: list[float] = dataclasses.field(default_factory=list)
    oom_events: list[OomEvent] = dataclasses.field(default_factory=list)
    memory: list[StepMemory] = dataclasses.field(default_factory=list)
    optimizer_state: dict[str, Any] | None = None

    def payload(self, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        return {
            "version": 1, "recipe": self.recipe.to_dict(), "steps_done": self.steps_done,
            "loss_history": list(self.loss_history), "oom_events": [to_dict(e) for e in self.oom_events],
            "memory": [to_dict(m) for m in self.memory], "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        }


def _restore(payload: dict[str, Any], model: torch.nn.Module) -> _State:
    model.load_state_dict(payload["model"])
    torch.set_rng_state(payload["torch_rng"])
    random.setstate(payload["python_rng"])
    return _State(
        recipe=Recipe.from_dict(payload["recipe"]),
        steps_done=payload["steps_done"],
        loss_history=list(payload["loss_history"]),
        oom_events=[from_dict(OomEvent, e) for e in payload["oom_events"]],
        memory=[from_dict(StepMemory, m) for m in payload["memory"]],
        optimizer_state=payload["optimizer"],
    )


def _check_budget(runner: StepRunner, budget_bytes: int | None) -> None:
    if budget_bytes is None:
        return
    persistent = persistent_tensors(runner.model, runner.handle.effects.optimizer_owned)
    seen, minimum = set(), 0
    for tensor, category, _ in persistent:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            minimum += tensor.untyped_storage().nbytes()
    minimum += sum(p.numel() * p.element_size() for p in runner.model.parameters() if p.requires_grad)  # gradients
    if budget_bytes < minimum:
        raise InfeasibleBudgetError(
            f"budget {budget_bytes} bytes is below the {minimum} bytes the parameters, buffers and gradients need "
            "before any activation; raise --budget to at least that, or shrink the model (bf16-weights, smaller optimizer state)",
            minimum,
        )


def _step_with_recovery(runner, batch, guard, state, step, log, device, phase) -> float:
    while True:
        guard.reset_peak()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with guard:
                return runner.step(batch)
        except torch.OutOfMemoryError as error:
            if phase["now"] == "optimizer":
                raise TrainingStoppedError(
                    f"step {step} runs out of memory in the optimizer step itself ({error}); a smaller micro-batch "
                    "cannot help and the step may be partly applied, so training stops with the last checkpoint kept: "
                    "use optimizer_state bf16 or 8bit, offload the optimizer, or raise the budget"
                ) from None
            runner.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            before = state.recipe.micro_batch_size
            after = smaller_micro_batch(before)
            if after is None:
                raise TrainingStoppedError(
                    f"step {step} runs out of memory even with a micro-batch of 1 ({error}); "
                    "the last checkpoint is kept: raise the budget or use a lighter recipe (checkpointing, bf16)"
                ) from None
            state.oom_events.append(OomEvent(step=step, micro_batch_size_before=before, micro_batch_size_after=after))
            log({"event": "oom", "step": step, "micro_batch_size_before": before, "micro_batch_size_after": after})
            state.recipe = state.recipe.replace(micro_batch_size=after)
            runner.recipe = state.recipe


def _optimizer_tensors(optimizer: Any):
    for param_state in optimizer.state.values():
        for value in param_state.values():
            if isinstance(value, torch.Tensor):
                yield value


def _step_memory(step: int, guard: BudgetGuard, device: torch.device) -> StepMemory:
    if device.type == "cuda":
        return StepMemory(step=step, allocated_bytes=torch.cuda.memory_allocated(device),
                          peak_bytes=torch.cuda.max_memory_allocated(device), reserved_bytes=torch.cuda.memory_reserved(device))
    return StepMemory(step=step, allocated_bytes=guard.live_bytes, peak_bytes=guard.peak_bytes)
