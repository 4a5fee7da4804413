"""`train`: run training steps, and when a step runs out of memory, shrink the micro-batch and redo it.

On an OOM the step's gradients are dropped, the micro-batch is halved and the number of
accumulation passes doubled, so the effective batch stays what the user asked for, and the same
step is redone on the same samples: none is skipped, none is seen twice. (Accelerate's
`find_executable_batch_size` changes the effective batch instead; Lightning's batch-size finder
settles on a size that only just fits.)

Resume gives the samples of an uninterrupted run to every deterministic `make_batch`, whatever
generator it draws from. A checkpoint holds the global generators' states (torch CPU and CUDA,
numpy, Python `random`) at two moments: the start of the run, and the step boundary it was written
at. On resume, the global generators are set to the start-of-run states and `make_batch` is
called once for every finished step (the batches are dropped): this advances generators memwise
cannot see, such as a `torch.Generator` held in a closure, exactly as the first run did. Then the
global generators are set to the boundary states, so the draws of the finished steps (batches,
dropout) are not repeated. The checkpoint also holds a digest of the last batch before it (and the
generator states its draw started from); the replay's batch must match it, or the resume warns
that `make_batch` is not reproducible.

Known limitations:
    A `make_batch` whose private generator's draws depend on the global generators (how many
    samples to draw, say) while the step also draws from them (dropout) replays exactly only for
    the last batch before the checkpoint. Replaying costs one `make_batch` call per finished step
    (benchmarks/train/bench_resume.py: under 1% of a step for the built-in workloads).
"""

import contextlib
import dataclasses
import gc
import hashlib
import math
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from memwise.core.checks import is_int, positive_int
from memwise.core.errors import BadInputError, MemwiseError
from memwise.core.recipe import Mode, OptimizerName, OptimizerStateDtype, Recipe
from memwise.core.rng import capture_rng, restore_rng, seed_all
from memwise.core.serialize import from_dict, to_dict
from memwise.core.step import StepRunner, resolve_recipe, run_device
from memwise.core.workload import Workload, move_batch, split_batch
from memwise.measure.budget_guard import BudgetGuard
from memwise.measure.tracker import persistent_tensors
from memwise.report.atomic import check_writable_directory
from memwise.train.checkpoint_io import PAYLOAD_VERSION, CheckpointDirectory

LogCallback = Callable[[dict[str, Any]], None]


class TrainingStoppedError(MemwiseError):
    """Training cannot go on; the last checkpoint is kept."""


class InfeasibleBudgetError(TrainingStoppedError):
    """The step cannot fit the budget (or the device) at any micro-batch size (CLI exit code 3).

    Attributes:
        minimum_bytes: what a step with a micro-batch of 1 needs (see `train`), None when unknown.
    """

    def __init__(self, message: str, minimum_bytes: int | None) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class NonFiniteLossError(TrainingStoppedError):
    """A step's loss was NaN or infinite and `stop_on_nonfinite` was set (CLI exit code 1)."""


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
        loss_history: the loss of every step, in order (NaN or inf where it was not finite; JSON
            writes those as null).
        nonfinite_loss_steps: the steps whose loss was NaN or infinite.
        memory: per step, bytes allocated after it and its peak.
        notes: what the recipe's strategies said about this run (e.g. a setting ignored on CPU).
    """

    steps_done: int
    oom_events: tuple[OomEvent, ...]
    final_recipe: Recipe
    peak_bytes: int
    loss_history: tuple[float, ...]
    nonfinite_loss_steps: tuple[int, ...] = ()
    memory: tuple[StepMemory, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = to_dict(self)
        data["loss_history"] = [loss if math.isfinite(loss) else None for loss in self.loss_history]  # JSON has no NaN
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainResult":
        if isinstance(data, dict) and isinstance(data.get("loss_history"), list):
            data = {**data, "loss_history": [math.nan if loss is None else loss for loss in data["loss_history"]]}
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
    overwrite: bool = False,
    seed: int | None = None,
    stop_on_nonfinite: bool = False,
    workload_identity: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    log: LogCallback | None = None,
) -> TrainResult:
    """Trains `workload.model` in place up to `steps` optimizer steps, recovering from OOM.

    Args:
        workload: what to train; its model is updated in place.
        recipe: how to run a step; `micro_batch_size` is where recovery starts.
        steps: the target number of optimizer steps, counting those done before a resume (a
            resume may raise it past the checkpoint; at or below the steps done, nothing runs).
        budget_bytes: a memory budget. On CPU (and on CUDA too) a guard raises
            `torch.OutOfMemoryError` when live tensor bytes exceed it; without a budget only a
            real CUDA OOM triggers recovery.
        checkpoint_dir: where to keep checkpoints (the last two, written atomically) every
            `checkpoint_every` steps, at the end, and at the step boundary after Ctrl-C. The run
            locks the directory; a directory that holds a checkpoint is refused unless `resume`
            or `overwrite`.
        checkpoint_every: steps between checkpoints.
        resume: continue from the newest readable checkpoint in `checkpoint_dir`; the run must be
            the same (workload identity, recipe, seed), see the module docstring for the samples.
        overwrite: start over in a `checkpoint_dir` that holds checkpoints (they are deleted).
        seed: seeds torch, numpy and Python `random` right before the first step (the CLI also
            seeds before building the model); part of the run's identity.
        stop_on_nonfinite: stop at the first NaN/inf loss (the checkpoint of that step is not
            written, so the last good one is kept).
        workload_identity: what names the workload for the resume check (the CLI passes the spec
            and its args); default: the workload's name and model class.
        device: `cpu` or `cuda[:N]`.
        log: called with a dict per event: `step`, `oom`, `nonfinite`, `warning`, `resumed`,
            `interrupted`, `target_reached`.

    Returns:
        A TrainResult.

    Raises:
        InfeasibleBudgetError: the step cannot fit at any micro-batch size. With a budget this is
            checked before the first step against an estimate, on fake tensors, of the step with
            one sample of the first batch (parameters, buffers, gradients, optimizer state,
            activations, temporaries and kernel scratch, which the CPU guard does not see: the
            minimum is 0.3-2% above the guard's own peak of a batch-1 run). Where the estimate
            cannot run, the minimum is parameters, buffers, gradients and the built-in optimizers' state.
        TrainingStoppedError: see its subclasses.
        KeyboardInterrupt: after Ctrl-C (SIGINT), at the next step boundary, once the checkpoint
            is written.
    """
    positive_int(steps, "steps")
    positive_int(checkpoint_every, "checkpoint_every")
    if seed is not None and not is_int(seed):
        raise BadInputError(f"seed: must be an integer, got {seed!r}")
    if budget_bytes is not None:
        positive_int(budget_bytes, "budget_bytes")
    if resume and checkpoint_dir is None:
        raise BadInputError("resume: needs a checkpoint directory (--checkpoint-dir)")
    if resume and overwrite:
        raise BadInputError("overwrite: cannot be combined with resume; --overwrite starts the run over")
    device = run_device(device)
    directory = check_writable_directory(checkpoint_dir, "checkpoint_dir") if checkpoint_dir is not None else None
    requested = resolve_recipe(workload, recipe)
    identity = {
        "workload": workload_identity if workload_identity is not None else {"name": workload.name, "model": type(workload.model).__name__},
        "recipe": requested.to_dict(),
        "seed": seed,
    }
    run = _Run(workload=workload, steps=steps, budget_bytes=budget_bytes, checkpoint_every=checkpoint_every,
               stop_on_nonfinite=stop_on_nonfinite, device=device, log=log or (lambda record: None), identity=identity)
    with contextlib.ExitStack() as stack:
        if directory is not None:
            run.store = stack.enter_context(CheckpointDirectory(directory))
            existing = run.store.checkpoints()
            if existing and not resume and not overwrite:
                raise BadInputError(
                    f"checkpoint_dir: {str(directory)!r} already holds a checkpoint ({existing[0].name}); "
                    "pass --resume to continue that run, or --overwrite to delete it and start over"
                )
            if overwrite:
                run.store.remove_all()
        if resume:
            return run.resume()
        recipe = requested if requested.micro_batch_size is not None else requested.replace(micro_batch_size=requested.batch_size)
        return run.start(recipe, seed)


@dataclasses.dataclass
class _State:
    """What a checkpoint saves besides the model and optimizer."""

    recipe: Recipe
    steps_done: int = 0
    loss_history: list[float] = dataclasses.field(default_factory=list)
    nonfinite_loss_steps: list[int] = dataclasses.field(default_factory=list)
    oom_events: list[OomEvent] = dataclasses.field(default_factory=list)
    memory: list[StepMemory] = dataclasses.field(default_factory=list)
    rng_at_start: dict[str, Any] | None = None
    # (step, digest, generator states before its make_batch) of the last batch before a checkpoint
    batch_digest: tuple[int, str, dict[str, Any]] | None = None


class _Run:
    """One call of `train`: the state that the steps, the checkpoints and the recovery share."""

    def __init__(self, *, workload: Workload, steps: int, budget_bytes: int | None, checkpoint_every: int,
                 stop_on_nonfinite: bool, device: torch.device, log: LogCallback, identity: dict[str, Any]) -> None:
        self.workload = workload
        self.steps = steps
        self.budget_bytes = budget_bytes
        self.checkpoint_every = checkpoint_every
        self.stop_on_nonfinite = stop_on_nonfinite
        self.device = device
        self.log = log
        self.identity = identity
        self.store: CheckpointDirectory | None = None
        self.model = workload.model.to(device)
        self.phase = "idle"
        self.minimum_bytes: int | None = None

    def start(self, recipe: Recipe, seed: int | None) -> TrainResult:
        if seed is not None:
            seed_all(seed)
        state = _State(recipe=recipe, rng_at_start=capture_rng())
        return self._loop(state, optimizer_state=None, scaler_state=None)

    def resume(self) -> TrainResult:
        payload, path = self.store.load_latest(warn=self._warn)
        _check_identity(payload["identity"], self.identity, path)
        state = _State(
            recipe=Recipe.from_dict(payload["recipe"]),
            steps_done=payload["steps_done"],
            loss_history=list(payload["loss_history"]),
            nonfinite_loss_steps=list(payload["nonfinite_loss_steps"]),
            oom_events=[from_dict(OomEvent, event) for event in payload["oom_events"]],
            memory=[from_dict(StepMemory, memory) for memory in payload["memory"]],
            rng_at_start=payload["rng_at_start"],
            batch_digest=payload["batch_digest"],
        )
        self.log({"event": "resumed", "path": str(path), "steps_done": state.steps_done})
        if state.steps_done >= self.steps:
            self.log({"event": "target_reached", "steps_done": state.steps_done, "steps": self.steps})
            return self._result(state, notes=())
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as error:
            raise BadInputError(f"--resume: the model does not match the checkpoint {str(path)!r}: {error}") from None
        self._replay_batches(state)
        restore_rng(payload["rng"])
        optimizer_state, scaler_state = payload["optimizer"], payload["scaler"]
        del payload
        return self._loop(state, optimizer_state=optimizer_state, scaler_state=scaler_state)

    def _replay_batches(self, state: _State) -> None:
        """Calls make_batch for every finished step from the start-of-run generator states (see module docstring)."""
        restore_rng(state.rng_at_start)
        checked_step, digest, rng_before = state.batch_digest if state.batch_digest is not None else (None, None, None)
        for step in range(state.steps_done):
            if step == checked_step:  # as the first run drew it (the steps in between also drew, e.g. for dropout)
                restore_rng(rng_before)
            batch = self.workload.make_batch(state.recipe.batch_size)
            if step == checked_step and batch_digest(batch) != digest:
                self._warn(
                    f"make_batch gave a different batch for step {step} than the interrupted run did: it is not "
                    "deterministic, or draws from a generator memwise cannot restore; the resumed run may see other samples"
                )
            del batch

    def _checkpoint_due(self, steps_done: int) -> bool:
        return self.store is not None and (steps_done % self.checkpoint_every == 0 or steps_done == self.steps)

    def _draw(self, state: _State, step: int) -> tuple[Any, tuple[int, str, dict[str, Any]] | None]:
        """The batch of `step`; for a step that ends in a checkpoint, also its digest and the generator states before it."""
        due = self._checkpoint_due(step + 1)
        rng_before = capture_rng() if due else None
        batch = self.workload.make_batch(state.recipe.batch_size)
        return batch, ((step, batch_digest(batch), rng_before) if due else None)

    def _loop(self, state: _State, optimizer_state: dict[str, Any] | None, scaler_state: dict[str, Any] | None) -> TrainResult:
        cpu_batch, digest = self._draw(state, state.steps_done)
        if self.budget_bytes is not None:  # before the strategies patch the model: the estimate applies them itself
            self.minimum_bytes = self._minimum_bytes(state.recipe, cpu_batch)
            if self.budget_bytes < self.minimum_bytes:
                raise InfeasibleBudgetError(
                    f"budget {self.budget_bytes} bytes is below the {self.minimum_bytes} bytes a step needs with a "
                    "micro-batch of 1 (parameters, buffers, gradients, optimizer state and activations, estimated on "
                    "fake tensors); raise --budget to at least that, or shrink the model's state (bf16-weights, "
                    "optimizer_state bf16 or 8bit, offload)",
                    self.minimum_bytes,
                )
        runner = StepRunner(self.workload, state.recipe, Mode.TRAIN, self.model, self.device, on_phase=self._on_phase)
        try:
            if optimizer_state is not None:
                runner.optimizer.load_state_dict(optimizer_state)
                del optimizer_state
            if scaler_state is not None and runner.scaler is not None:
                runner.scaler.load_state_dict(scaler_state)
            guard = BudgetGuard(self.budget_bytes)
            # the restored optimizer state counts from the first step after a resume, as it does uninterrupted
            guard.track([tensor for tensor, _, _ in persistent_tensors(self.model, runner.handle.effects.optimizer_owned)])
            guard.track(list(_optimizer_tensors(runner.optimizer)))
            with _InterruptAtBoundary(self._warn) as interrupt:
                saved_at = state.steps_done
                while state.steps_done < self.steps:
                    step = state.steps_done
                    if cpu_batch is None:
                        cpu_batch, digest = self._draw(state, step)
                    batch = move_batch(cpu_batch, self.device)
                    cpu_batch = None
                    guard.track(batch)
                    loss = self._step_with_recovery(runner, batch, guard, state, step)
                    del batch
                    guard.track(list(_optimizer_tensors(runner.optimizer)))
                    self._record_step(state, step, loss, guard)
                    if digest is not None:
                        state.batch_digest = digest
                    if self._checkpoint_due(state.steps_done):  # a non-finite loss with stop_on_nonfinite has raised before this
                        self._save(state, runner)
                        saved_at = state.steps_done
                    if interrupt.requested:
                        if self.store is not None and saved_at != state.steps_done:
                            self._save(state, runner)
                        self.log({"event": "interrupted", "steps_done": state.steps_done})
                        raise KeyboardInterrupt
        finally:
            runner.close()
        return self._result(state, notes=tuple(runner.handle.notes))

    def _record_step(self, state: _State, step: int, loss: float, guard: BudgetGuard) -> None:
        state.loss_history.append(loss)
        state.steps_done += 1
        state.memory.append(_step_memory(step, guard, self.device))
        self.log({"event": "step", "step": step, "loss": loss, "micro_batch_size": state.recipe.micro_batch_size,
                  "allocated_bytes": state.memory[-1].allocated_bytes, "peak_bytes": state.memory[-1].peak_bytes})
        if not math.isfinite(loss):
            state.nonfinite_loss_steps.append(step)
            self.log({"event": "nonfinite", "step": step, "loss": loss})
            if self.stop_on_nonfinite:
                raise NonFiniteLossError(
                    f"step {step}: the loss is {loss}; training stops (--stop-on-nonfinite) and the last checkpoint "
                    "before it is kept: lower the learning rate, use bf16 instead of fp16, or check the data"
                )

    def _save(self, state: _State, runner: StepRunner) -> None:
        payload = {
            "version": PAYLOAD_VERSION, "identity": self.identity, "recipe": state.recipe.to_dict(),
            "steps_done": state.steps_done, "loss_history": list(state.loss_history),
            "nonfinite_loss_steps": list(state.nonfinite_loss_steps),
            "oom_events": [to_dict(event) for event in state.oom_events], "memory": [to_dict(m) for m in state.memory],
            "model": self.model.state_dict(), "optimizer": runner.optimizer.state_dict(),
            "scaler": runner.scaler.state_dict() if runner.scaler is not None else None,
            "rng_at_start": state.rng_at_start, "rng": capture_rng(), "batch_digest": state.batch_digest,
        }
        path = self.store.save(payload, state.steps_done)
        self.log({"event": "checkpoint", "path": str(path), "steps_done": state.steps_done})

    def _minimum_bytes(self, recipe: Recipe, cpu_batch: Any) -> int:
        """The estimated peak of a step with a micro-batch of 1 (one sample of the first batch), on fake tensors.

        The estimate runs real ops only to learn kernel scratch; the generators are put back after
        it, so a run with a budget draws the same numbers as one without.
        """
        from memwise.estimate.estimator import estimate

        sample = split_batch(cpu_batch, 1)[0]
        one_sample = Workload(self.model, lambda batch_size: sample, loss_fn=self.workload.loss_fn,
                              optimizer_factory=self.workload.optimizer_factory, name=self.workload.name, default_batch_size=1)
        states = capture_rng()
        try:
            return estimate(one_sample, recipe.replace(batch_size=1, micro_batch_size=1), "cpu", what_if=False).peak_bytes
        except Exception as error:  # e.g. data-dependent ops the fake run cannot follow: fall back to what is certain
            floor = _state_bytes(self.model, recipe, self.workload)
            self._warn(f"the minimum for --budget could not be estimated ({type(error).__name__}: {error}); it counts "
                       f"only parameters, buffers, gradients and the built-in optimizers' state: {floor} bytes")
            return floor
        finally:
            restore_rng(states)

    def _on_phase(self, name: str) -> None:
        self.phase = name

    def _warn(self, message: str) -> None:
        self.log({"event": "warning", "message": message})

    def _step_with_recovery(self, runner: StepRunner, batch: Any, guard: BudgetGuard, state: _State, step: int) -> float:
        while True:
            guard.reset_peak()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            try:
                with guard:
                    return runner.step(batch)
            except torch.OutOfMemoryError as error:
                if self.phase == "optimizer":
                    raise InfeasibleBudgetError(
                        f"step {step} runs out of memory in the optimizer step itself ({error}); a smaller micro-batch "
                        "cannot help and the step may be partly applied, so training stops with the last checkpoint kept: "
                        "use optimizer_state bf16 or 8bit, offload the optimizer, or raise the budget",
                        self.minimum_bytes,
                    ) from None
                runner.optimizer.zero_grad(set_to_none=True)
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                before = state.recipe.micro_batch_size
                after = smaller_micro_batch(before)
                if after is None:
                    raise InfeasibleBudgetError(
                        f"step {step} runs out of memory even with a micro-batch of 1 ({error}); "
                        "the last checkpoint is kept: raise the budget or use a lighter recipe (checkpointing, bf16)",
                        self.minimum_bytes,
                    ) from None
                state.oom_events.append(OomEvent(step=step, micro_batch_size_before=before, micro_batch_size_after=after))
                self.log({"event": "oom", "step": step, "micro_batch_size_before": before, "micro_batch_size_after": after})
                state.recipe = state.recipe.replace(micro_batch_size=after)
                runner.recipe = state.recipe

    def _result(self, state: _State, notes: tuple[str, ...]) -> TrainResult:
        return TrainResult(
            steps_done=state.steps_done,
            oom_events=tuple(state.oom_events),
            final_recipe=state.recipe,
            peak_bytes=max((m.peak_bytes for m in state.memory), default=0),
            loss_history=tuple(state.loss_history),
            nonfinite_loss_steps=tuple(state.nonfinite_loss_steps),
            memory=tuple(state.memory),
            notes=notes,
        )


def _check_identity(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Raises BadInputError naming every field where this run differs from the checkpoint's."""
    saved_fields, now_fields = _flatten(saved), _flatten(now)
    differing = [name for name in sorted(set(saved_fields) | set(now_fields))
                 if name != "recipe.version" and saved_fields.get(name) != now_fields.get(name)]
    if differing:
        details = "; ".join(f"{name}: checkpoint {saved_fields.get(name)!r}, now {now_fields.get(name)!r}" for name in differing)
        raise BadInputError(
            f"--resume: this run differs from the one that wrote {str(path)!r} in {', '.join(differing)} ({details}); "
            "run with the same options, or use another --checkpoint-dir (or --overwrite to start over)"
        )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        flat = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): data}


def batch_digest(batch: Any) -> str:
    """A SHA-256 of a batch's structure and tensor bytes, to check that a replayed batch is the same."""
    hasher = hashlib.sha256()
    leaves, spec = tree_flatten(batch)
    hasher.update(repr(spec).encode())
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            hasher.update(f"{leaf.dtype}{tuple(leaf.shape)}".encode())
            hasher.update(leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        else:
            hasher.update(repr(leaf).encode())
    return hasher.hexdigest()


class _InterruptAtBoundary:
    """Defers Ctrl-C (SIGINT) to the next step boundary; a second Ctrl-C interrupts at once.

    Only the main thread can receive signals; elsewhere this does nothing.
    """

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.requested = False
        self._installed = False
        self._previous: Any = signal.default_int_handler

    def __enter__(self) -> "_InterruptAtBoundary":
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_signal)
            self._previous = previous if previous is not None else signal.SIG_DFL  # None: installed outside Python
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C is not deferred
        self.warn("interrupted: finishing this step, then writing a checkpoint (Ctrl-C again to stop now)")


def _state_bytes(model: torch.nn.Module, recipe: Recipe, workload: Workload) -> int:
    """A lower bound of what a step holds before activations: parameters, buffers, gradients, and the
    optimizer state of the built-in optimizers (SGD: one momentum, Adam/AdamW: two moments, in the
    recipe's optimizer_state precision); a workload's own optimizer counts as none."""
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in (*model.parameters(), *model.buffers())}
    trainable = [param for param in model.parameters() if param.requires_grad]
    grads = sum(param.numel() * param.element_size() for param in trainable)
    name = recipe.optimizer or (None if workload.optimizer_factory is not None else OptimizerName.ADAMW)
    moments = {OptimizerName.SGD: 1, OptimizerName.ADAM: 2, OptimizerName.ADAMW: 2}.get(name, 0)
    moment_bytes = {OptimizerStateDtype.FP32: 4, OptimizerStateDtype.BF16: 2, OptimizerStateDtype.INT8: 1}[recipe.optimizer_state]
    return sum(storages.values()) + grads + moments * moment_bytes * sum(param.numel() for param in trainable)


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
