"""Running one training or inference step of a Workload under a Recipe.

The runner is shared by measurement (`profile`) and estimation (`estimate`): both watch the same
step, one on real tensors and one on fake ones. It reports phase boundaries to an observer so they
can attribute memory to forward, backward and optimizer.
"""

from collections.abc import Callable
from typing import Any

import torch

from memwise.core.errors import BadInputError
from memwise.core.recipe import (
    OPTIMIZER_SETTINGS,
    Mode,
    OptimizerImpl,
    OptimizerName,
    Precision,
    Recipe,
)
from memwise.core.strategy import apply_, forward_context, optimizer_builder
from memwise.core.workload import (
    Workload,
    call_model,
    loss_from_output,
    move_batch,
    split_batch,
)

PhaseCallback = Callable[[str], None]
BatchCallback = Callable[[Any], None]

_OPTIMIZERS: dict[OptimizerName, type[torch.optim.Optimizer]] = {
    OptimizerName.SGD: torch.optim.SGD,
    OptimizerName.ADAM: torch.optim.Adam,
    OptimizerName.ADAMW: torch.optim.AdamW,
}
_IMPL_OPTIONS = {
    OptimizerImpl.FOREACH: {"foreach": True},
    OptimizerImpl.FUSED: {"fused": True},
    OptimizerImpl.FOR_LOOP: {"foreach": False},
}


def build_optimizer(
    workload: Workload, recipe: Recipe, model: torch.nn.Module, *, foreach: bool | None = None,
    params: list[torch.nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    """The recipe's optimizer over `params` (default: `model`'s trainable ones), the workload's own when unset.

    `recipe.optimizer_impl` picks the kernels (`foreach`, `fused`, `for-loop`). Without it,
    `foreach` forces the multi-tensor implementation on or off (None keeps torch's default: on for
    CUDA parameters, off for CPU ones).
    """
    if params is None:
        params = [param for param in model.parameters() if param.requires_grad]
    if not params:
        raise BadInputError(f"workload {workload.name!r}: the model has no trainable parameters; use mode 'infer'")
    impl = _IMPL_OPTIONS[recipe.optimizer_impl] if recipe.optimizer_impl is not None else {}
    if recipe.optimizer is None and workload.optimizer_factory is not None:
        optimizer = workload.optimizer_factory(params)
        if impl:
            _set_impl(optimizer, recipe.optimizer_impl, impl)
        return optimizer
    name = recipe.optimizer or OptimizerName.ADAMW
    optimizer = _OPTIMIZERS[name](params, **OPTIMIZER_SETTINGS[name], **impl)
    if not impl and foreach is not None:
        for group in optimizer.param_groups:
            group["foreach"] = foreach
    return optimizer


def _set_impl(optimizer: torch.optim.Optimizer, name: OptimizerImpl, options: dict[str, bool]) -> None:
    """Sets foreach/fused on a workload's own optimizer, which must be one of torch's that has them."""
    if not all(key in optimizer.defaults for key in ("foreach", "fused")):
        raise BadInputError(
            f"optimizer_impl: {name.value!r} needs one of torch's built-in optimizers with foreach/fused options; "
            f"the workload's optimizer is {type(optimizer).__name__}: leave optimizer_impl unset or set optimizer"
        )
    for group in optimizer.param_groups:
        group.update({"foreach": None, "fused": None, **options})


class StepRunner:
    """Runs steps of `workload` under `recipe` on `model` (the workload's model or a copy of it).

    The recipe's strategies are applied to `model` when the runner is made (`close()` undoes
    them). A training step makes one batch of `recipe.batch_size` samples, runs forward and
    backward on each micro-batch (the loss divided by the number of micro-batches, so the
    gradients are those of the whole batch), then the optimizer step and `zero_grad`.

    Args:
        workload: what to run.
        recipe: how to run it; `batch_size` must be set (see `resolve_recipe`).
        mode: `train` or `infer`.
        model: the module to run, already on `device`.
        device: where the step runs.
        on_phase: called with `forward`, `backward`, `optimizer` as each phase begins and with
            `idle` when the step is done.
        on_batch: called with the batch right after it is made and moved to the device.
        optimizer_foreach: see `build_optimizer`.
    """

    def __init__(
        self,
        workload: Workload,
        recipe: Recipe,
        mode: Mode,
        model: torch.nn.Module,
        device: torch.device,
        on_phase: PhaseCallback | None = None,
        on_batch: BatchCallback | None = None,
        optimizer_foreach: bool | None = None,
    ) -> None:
        if recipe.batch_size is None:
            raise BadInputError("recipe.batch_size: must be set before running a step")
        self.workload = workload
        self.recipe = recipe
        self.mode = Mode(mode)
        self.model = model
        self.device = device
        self.on_phase = on_phase or (lambda phase: None)
        self.on_batch = on_batch or (lambda batch: None)
        self.handle = apply_(model, recipe)
        self.optimizer = None
        if self.mode == Mode.TRAIN:
            base = lambda params: build_optimizer(workload, recipe, model, foreach=optimizer_foreach, params=params)  # noqa: E731
            trainable = [param for param in model.parameters() if param.requires_grad]
            if not trainable:
                raise BadInputError(f"workload {workload.name!r}: the model has no trainable parameters; use mode 'infer'")
            self.optimizer = optimizer_builder(base, recipe, self.handle)(trainable)
        self.scaler = (
            torch.amp.GradScaler(device.type) if self.mode == Mode.TRAIN and recipe.precision == Precision.FP16 else None
        )

    def close(self) -> None:
        """Undoes the recipe's strategies on the model."""
        self.handle.remove()

    def make_batch(self, batch_size: int | None = None) -> Any:
        batch = move_batch(self.workload.make_batch(batch_size or self.recipe.batch_size), self.device)
        self.on_batch(batch)
        return batch

    def step(self, batch: Any = None) -> float | None:
        """Runs one step (on `batch` when given); returns the loss as a float in train mode, else None."""
        if batch is None:
            batch = self.make_batch()
        if self.mode == Mode.INFER:
            self.model.eval()
            self.on_phase("forward")
            with torch.inference_mode(), forward_context(self.recipe, self.device, self.handle):
                output = call_model(self.model, batch)
            del output, batch
            self.on_phase("idle")
            return None
        self.model.train()
        # The batch stays alive through backward and the optimizer step, as in a user's
        # `for batch in loader:` loop; each micro-batch (a view of it) until its backward is done.
        micro_batches = split_batch(batch, self.recipe.micro_batch_size or self.recipe.batch_size)
        passes = len(micro_batches)
        loss_total = None
        while micro_batches:
            micro_batch = micro_batches.pop(0)
            self.on_phase("forward")
            with forward_context(self.recipe, self.device, self.handle):
                loss = loss_from_output(call_model(self.model, micro_batch), micro_batch, self.workload.loss_fn)
            if passes > 1:
                loss = loss / passes
            self.on_phase("backward")
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_total = loss.detach() if loss_total is None else loss_total + loss.detach()
            del loss, micro_batch
        self.on_phase("optimizer")
        if self.scaler is not None:
            if hasattr(self.optimizer, "sync_grads"):  # master weights: unscale their gradients
                self.optimizer.sync_grads()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.recipe.zero_grad_set_to_none)
        self.on_phase("idle")
        return None if loss_total.is_meta or _is_fake(loss_total) else float(loss_total)


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def run_device(device: str | torch.device) -> torch.device:
    """The device real steps run on, checked: `cpu` or an available `cuda[:N]`."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadInputError(f"device: cannot read {device!r}; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("device: CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise BadInputError(f"device: {device.type!r} is not supported for real steps; use cpu or cuda[:N]")
    return device


def resolve_recipe(workload: Workload, recipe: Recipe | None) -> Recipe:
    """The recipe with `batch_size` filled from the workload's default when unset."""
    recipe = recipe or Recipe()
    if recipe.batch_size is None:
        recipe = recipe.replace(batch_size=workload.default_batch_size)
    return recipe
