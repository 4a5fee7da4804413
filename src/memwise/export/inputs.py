"""The inputs an exported model is traced and checked with: a workload's real batches or random ones.

A training batch holds labels that inference does not take. The inference inputs of a batch are:
a dict without its `labels` (an encoder-decoder gets the `decoder_input_ids` its labels imply); a tuple or list cut to the elements bound to the forward's required
parameters (`SimpleCNN.forward(x, labels=None)` takes `x` only); a tensor as it is.
"""

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError
from memwise.core.workload import Workload

LABEL_KEYS = ("labels", "label", "targets", "target")


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """Positional and keyword inputs of one forward call."""

    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor]

    def call(self, model: Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.args, *self.kwargs.values()]

    @property
    def batch_size(self) -> int:
        return self.tensors()[0].shape[0]

    def randomized(self, generator: torch.Generator) -> "ModelInputs":
        """Random inputs of the same shapes and dtypes: floats from N(0, 1), integers drawn
        uniformly from the range the real inputs span (token ids stay below the vocabulary, an
        all-ones attention mask stays all ones)."""
        return ModelInputs(tuple(_random_like(t, generator) for t in self.args),
                           {name: _random_like(t, generator) for name, t in self.kwargs.items()})


class InputSource:
    """Makes `ModelInputs` of any batch size for a model.

    Args:
        model: the model the inputs are for.
        make_batch: a workload's `make_batch(batch_size)`, or None.
        example: example inputs (tensor, tuple or dict) when there is no workload; other batch
            sizes repeat its rows.
    """

    def __init__(self, model: torch.nn.Module, *, make_batch: Callable[[int], Any] | None = None, example: Any = None) -> None:
        if make_batch is None and example is None:
            raise BadInputError("example_inputs: a bare model needs example inputs (a tensor, tuple or dict of tensors); "
                                "or pass a memwise.Workload")
        self.model = model
        self.make_batch = make_batch
        self.example = inference_inputs(model, example) if example is not None else None

    def real(self, batch_size: int) -> ModelInputs:
        positive_int(batch_size, "batch_size")
        if self.make_batch is not None:
            return inference_inputs(self.model, self.make_batch(batch_size))
        return _resized(self.example, batch_size)


def source_for(model_or_workload: Any, example_inputs: Any = None) -> tuple[torch.nn.Module, InputSource, str]:
    """(model, input source, name) for a Workload or a bare `nn.Module` with example inputs."""
    if isinstance(model_or_workload, Workload):
        model = model_or_workload.model
        return model, InputSource(model, make_batch=model_or_workload.make_batch, example=example_inputs), model_or_workload.name
    if isinstance(model_or_workload, torch.nn.Module):
        return model_or_workload, InputSource(model_or_workload, example=example_inputs), type(model_or_workload).__name__
    raise BadInputError(f"model_or_workload: expected a torch.nn.Module or memwise.Workload, got {type(model_or_workload).__name__}")


def inference_inputs(model: torch.nn.Module, batch: Any) -> ModelInputs:
    """The inputs of `batch` that inference takes (see the module docstring)."""
    if isinstance(batch, torch.Tensor):
        return ModelInputs((batch,), {})
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k not in LABEL_KEYS and isinstance(v, torch.Tensor)}
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if callable(prepare) and isinstance(batch.get("labels"), torch.Tensor) and "decoder_input_ids" not in kwargs:
            # An encoder-decoder (T5, BART) trained on labels derives its decoder inputs from them.
            kwargs["decoder_input_ids"] = prepare(labels=batch["labels"])
        if not kwargs:
            raise BadInputError(f"batch: no input tensors besides labels in keys {sorted(batch)}")
        return ModelInputs((), kwargs)
    if isinstance(batch, (tuple, list)):
        required = _required_positional(model)
        items = list(batch)[:required] if required else list(batch)
        if not items or not all(isinstance(item, torch.Tensor) for item in items):
            raise BadInputError(f"batch: expected tensors as the model's inputs, got {[type(i).__name__ for i in batch]}")
        return ModelInputs(tuple(items), {})
    raise BadInputError(f"batch: expected a tensor, tuple/list or dict of tensors, got {type(batch).__name__}")


def flat_outputs(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (tensor, tuple, dict or transformers ModelOutput), in pytree order."""
    return [leaf for leaf in tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _required_positional(model: torch.nn.Module) -> int:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in parameters if p.kind in kinds and p.default is inspect.Parameter.empty)


def _random_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    if tensor.is_floating_point():
        return torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
    if tensor.dtype == torch.bool:
        return torch.randint(0, 2, tensor.shape, generator=generator).bool()
    low, high = (int(tensor.min()), int(tensor.max()) + 1) if tensor.numel() else (0, 1)
    return torch.randint(low, high, tensor.shape, generator=generator, dtype=tensor.dtype)


def _resized(inputs: ModelInputs, batch_size: int) -> ModelInputs:
    def resize(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0:
            return tensor
        index = torch.arange(batch_size) % tensor.shape[0]
        return tensor[index]

    return ModelInputs(tuple(resize(t) for t in inputs.args), {k: resize(t) for k, t in inputs.kwargs.items()})
