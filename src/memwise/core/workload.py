"""`Workload`: what memwise needs to run one step of a user's model."""

from collections.abc import Callable, Mapping
from typing import Any

import torch

from memwise.core.errors import WorkloadError

Batch = Any
LossFn = Callable[[Any, Batch], torch.Tensor]
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class Workload:
    """A model plus the way to feed it one step.

    Args:
        model: the `nn.Module` to run.
        make_batch: `make_batch(batch_size)` returns one step's batch. A tensor is passed as
            `model(batch)`, a tuple or list as `model(*batch)`, a dict as `model(**batch)`.
        loss_fn: `loss_fn(output, batch) -> scalar`. None means the model's output is the loss:
            a scalar tensor, or an object with a `.loss` (as Hugging Face models return).
        optimizer_factory: `optimizer_factory(parameters) -> Optimizer`, used when the recipe
            names no optimizer. None means AdamW(lr=1e-3).
        evaluate: optional `evaluate(model) -> float` metric (higher is better), e.g. accuracy.
        name: a short name shown in reports.
        default_batch_size: the batch size used when the recipe sets none.
        extras: workload-specific helpers (e.g. a `train` function), by name.
        make_largest_batch: optional `make_largest_batch(batch_size)` returning the batch with the
            largest inputs `make_batch` can produce (e.g. the longest sequences), so that
            `memwise.plan` and `memwise.find_batch_size` size for it rather than for samples.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        make_batch: Callable[[int], Batch],
        loss_fn: LossFn | None = None,
        optimizer_factory: OptimizerFactory | None = None,
        evaluate: Callable[[torch.nn.Module], float] | None = None,
        *,
        name: str = "workload",
        default_batch_size: int = 8,
        extras: Mapping[str, Any] | None = None,
        make_largest_batch: Callable[[int], Batch] | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise WorkloadError(f"Workload model: expected a torch.nn.Module, got {type(model).__name__}")
        if not callable(make_batch):
            raise WorkloadError(f"Workload make_batch: expected a callable make_batch(batch_size), got {make_batch!r}")
        for arg_name, value in (("loss_fn", loss_fn), ("optimizer_factory", optimizer_factory), ("evaluate", evaluate),
                                ("make_largest_batch", make_largest_batch)):
            if value is not None and not callable(value):
                raise WorkloadError(f"Workload {arg_name}: expected a callable or None, got {value!r}")
        if isinstance(default_batch_size, bool) or not isinstance(default_batch_size, int) or default_batch_size <= 0:
            raise WorkloadError(f"Workload default_batch_size: must be a positive integer, got {default_batch_size!r}")
        self.model = model
        self.make_batch = make_batch
        self.loss_fn = loss_fn
        self.optimizer_factory = optimizer_factory
        self.evaluate = evaluate
        self.name = name
        self.default_batch_size = default_batch_size
        self.extras = dict(extras or {})
        self.make_largest_batch = make_largest_batch

    def __repr__(self) -> str:
        return f"Workload(name={self.name!r}, model={type(self.model).__name__}, default_batch_size={self.default_batch_size})"


def call_model(model: torch.nn.Module, batch: Batch) -> Any:
    """Calls `model` on `batch` following the Workload contract (tensor / sequence / mapping)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def loss_from_output(output: Any, batch: Batch, loss_fn: LossFn | None) -> torch.Tensor:
    """Returns the scalar loss of one step following the Workload contract."""
    loss = loss_fn(output, batch) if loss_fn is not None else getattr(output, "loss", output)
    if isinstance(output, Mapping) and loss_fn is None and "loss" in output:
        loss = output["loss"]
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise WorkloadError(
            "Workload loss: expected a scalar tensor (the model's output, its `.loss`, or loss_fn(output, batch)), "
            f"got {type(loss).__name__}" + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
            + "; pass loss_fn= to Workload"
        )
    return loss


def batch_tensors(batch: Batch) -> list[torch.Tensor]:
    """All tensors in a batch (tensor, sequence or mapping, one level deep)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else []
    return [value for value in values if isinstance(value, torch.Tensor)]


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """Moves every tensor of a batch to `device`, keeping its structure."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: move_batch(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(value, device) for value in batch)
    return batch


def batch_size_of(batch: Batch) -> int:
    """The number of samples in a batch: the first dimension of its first tensor."""
    tensors = batch_tensors(batch)
    if not tensors or tensors[0].dim() == 0:
        raise WorkloadError("batch: cannot find a tensor with a batch dimension to split into micro-batches")
    return tensors[0].shape[0]


def split_batch(batch: Batch, micro_batch_size: int) -> list[Batch]:
    """Splits a batch along dim 0 into micro-batches of `micro_batch_size` samples (views, no copies).

    Tensors whose first dimension is not the batch size (e.g. a shared mask) go to every micro-batch.
    """
    total = batch_size_of(batch)
    if total <= micro_batch_size:
        return [batch]

    def part(value: Any, start: int) -> Any:
        if isinstance(value, torch.Tensor):
            return value[start:start + micro_batch_size] if value.dim() and value.shape[0] == total else value
        if isinstance(value, Mapping):
            return {key: part(item, start) for key, item in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(part(item, start) for item in value)
        return value

    return [part(batch, start) for start in range(0, total, micro_batch_size)]
