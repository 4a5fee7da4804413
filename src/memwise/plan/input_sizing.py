"""Sizing for the largest input: a workload whose every batch is the largest it can make.

Peers size a batch on the inputs that happened to appear during their trials and then run out of
memory on a longer one. A workload may declare `make_largest_batch`; when it does not, memwise
draws `make_batch` several times and keeps the largest batch it saw, and says so.
"""

import dataclasses
import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_map

from memwise.core.workload import Batch, Workload, batch_tensors

DEFAULT_SAMPLES = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class InputSizing:
    """The input a plan or batch size was sized for.

    Attributes:
        source: `make_largest_batch` (declared by the workload) or `sampled` (the largest of
            `samples` draws of `make_batch`).
        samples: draws of `make_batch` per batch size (0 when declared).
        shapes: the shapes of the batch's tensors, in order.
        note: one sentence for the report.
    """

    source: str
    samples: int
    shapes: tuple[tuple[int, ...], ...]
    note: str


def _batch_bytes(batch: Batch) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in batch_tensors(batch))


def _clone(batch: Batch) -> Batch:
    return tree_map(lambda value: value.clone() if isinstance(value, torch.Tensor) else value, batch)


class LargestInput:
    """Wraps a workload so that every batch it makes is its largest at that batch size.

    Args:
        workload: the user's workload.
        samples: draws of `make_batch` per batch size when the workload declares no
            `make_largest_batch`.

    Attributes:
        workload: a Workload sharing the user's model, loss and optimizer, whose `make_batch`
            returns a fresh copy of the largest batch (so every step allocates its input, as usual).
    """

    def __init__(self, workload: Workload, *, samples: int = DEFAULT_SAMPLES) -> None:
        self.source = workload
        self.samples = samples
        self.declared = getattr(workload, "make_largest_batch", None) is not None
        self._largest: dict[int, Batch] = {}
        self.workload = Workload(
            workload.model, self._make_batch, workload.loss_fn, workload.optimizer_factory, workload.evaluate,
            name=workload.name, default_batch_size=workload.default_batch_size, extras=workload.extras,
        )

    def largest(self, batch_size: int) -> Batch:
        """The largest batch of `batch_size` samples (declared, or the largest of the samples drawn)."""
        if batch_size not in self._largest:
            # made outside any fake-tensor or tracking mode: the cached batch must be real, and each
            # step's copy of it (`_make_batch`) is then allocated, and seen, inside that step
            with _disable_current_modes():
                self._largest[batch_size] = self._draw(batch_size)
        return self._largest[batch_size]

    def _draw(self, batch_size: int) -> Batch:
        if self.declared:
            return self.source.make_largest_batch(batch_size)
        drawn = [self.source.make_batch(batch_size) for _ in range(self.samples)]
        return max(drawn, key=_batch_bytes)

    def _make_batch(self, batch_size: int) -> Batch:
        return _clone(self.largest(batch_size))

    def sizing(self, batch_size: int) -> InputSizing:
        """What the sizing at `batch_size` was based on."""
        shapes = tuple(tuple(tensor.shape) for tensor in batch_tensors(self.largest(batch_size)))
        if self.declared:
            return InputSizing(source="make_largest_batch", samples=0, shapes=shapes,
                               note=f"sized for the workload's declared largest input, shapes {_shapes_text(shapes)}")
        return InputSizing(
            source="sampled", samples=self.samples, shapes=shapes,
            note=(f"the workload declares no make_largest_batch: sized for the largest of {self.samples} sampled "
                  f"batches, shapes {_shapes_text(shapes)}; a larger input than those seen may not fit"),
        )


def _shapes_text(shapes: tuple[tuple[int, ...], ...]) -> str:
    return ", ".join("(" + ", ".join(str(size) for size in shape) + ")" for shape in shapes)

