"""Running one training or inference step of a Workload under a Recipe.

The runner is shared by measurement (`profile`) and estimation (`estimate`): both watch the same
step, one on real tensors and one on fake ones. It reports phase boundaries to an observer so they
can attribute memory to forward, backward and optimizer.
"""

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint

from memwise.core.blocks import find_blocks
from memwise.core.errors import BadInputError
from memwise.core.recipe import CheckpointMode, Mode, OptimizerName, Precision, Recipe
from memwise.core.workload import Workload, call_model, loss_from_output, move_batch

PhaseCallback = Callable[[str], None]
BatchCallback = Callable[[Any], None]

_AUTOCAST_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}
_OPTIMIZERS: dict[OptimizerName, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    OptimizerName.SGD: lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
    OptimizerName.ADAM: lambda params: torch.optim.Adam(params, lr=1e-3),
    OptimizerName.ADAMW: lambda params: torch.optim.AdamW(params, lr=1e-3),
}


def build_optimizer(
    workload: Workload, recipe: Recipe, model: torch.nn.Module, *, foreach: bool | None = None
) -> torch.optim.Optimizer:
    """The recipe's optimizer over `model`'s trainable parameters (the workload's own when unset).

    `foreach` forces the multi-tensor implementation on or off for the built-in optimizers (None
    keeps torch's default: on for CUDA parameters, off for CPU ones).
    """
    params = [param for param in model.parameters() if param.requires_grad]
    if not params:
        raise BadInputError(f"workload {workload.name!r}: the model has no trainable parameters; use mode 'infer'")
    if recipe.optimizer is None and workload.optimizer_factory is not None:
        return workload.optimizer_factory(params)
    optimizer = _OPTIMIZERS[recipe.optimizer or OptimizerName.ADAMW](params)
    if foreach is not None:
        for group in optimizer.param_groups:
            group["foreach"] = foreach
    return optimizer


def autocast_context(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for `precision` on `device`'s type, or a null context for fp32."""
    if precision == Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])


@contextlib.contextmanager
def checkpointing(model: torch.nn.Module, mode: CheckpointMode) -> Iterator[None]:
    """Within the context, every top-level block of `model` recomputes its activations in backward.

    Uses non-reentrant `torch.utils.checkpoint` by shadowing each block's `forward` on the instance;
    leaving the context restores the blocks exactly.
    """
    if mode == CheckpointMode.NONE:
        yield
        return
    patched = []
    for _, block in find_blocks(model):
        original = block.forward
        had_instance_forward = "forward" in block.__dict__

        def checkpointed(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = functools.wraps(original)(checkpointed)
        patched.append((block, original, had_instance_forward))
    try:
        yield
    finally:
        for block, original, had_instance_forward in patched:
            if had_instance_forward:
                block.forward = original
            else:
                del block.forward


class StepRunner:
    """Runs steps of `workload` under `recipe` on `model` (the workload's model or a copy of it).

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
        self.optimizer = build_optimizer(workload, recipe, model, foreach=optimizer_foreach) if self.mode == Mode.TRAIN else None
        self.scaler = (
            torch.amp.GradScaler(device.type) if self.mode == Mode.TRAIN and recipe.precision == Precision.FP16 else None
        )

    def make_batch(self) -> Any:
        batch = move_batch(self.workload.make_batch(self.recipe.batch_size), self.device)
        self.on_batch(batch)
        return batch

    def step(self) -> float | None:
        """Runs one step; returns the loss as a float in train mode, None in infer mode."""
        batch = self.make_batch()
        if self.mode == Mode.INFER:
            self.model.eval()
            self.on_phase("forward")
            with torch.inference_mode(), autocast_context(self.recipe.precision, self.device):
                output = call_model(self.model, batch)
            del output, batch
            self.on_phase("idle")
            return None
        self.model.train()
        self.on_phase("forward")
        with checkpointing(self.model, self.recipe.checkpoint):
            with autocast_context(self.recipe.precision, self.device):
                loss = loss_from_output(call_model(self.model, batch), batch, self.workload.loss_fn)
            del batch
            self.on_phase("backward")
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        loss_value = loss.detach()
        del loss
        self.on_phase("optimizer")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.on_phase("idle")
        return float(loss_value) if not loss_value.is_meta and not _is_fake(loss_value) else None


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def resolve_recipe(workload: Workload, recipe: Recipe | None) -> Recipe:
    """The recipe with `batch_size` filled from the workload's default when unset."""
    recipe = recipe or Recipe()
    if recipe.batch_size is None:
        recipe = recipe.replace(batch_size=workload.default_batch_size)
    return recipe
