"""Real values of the small tensors a fake run can know, so that data-dependent branches go the
way they go in the real run.

A fake tensor has shapes but no values. Model code that reads a value (`if attention_mask.all():`)
or asks whether it is being traced (transformers' `is_tracing(tensor)` is true for any fake
tensor) would take another branch than the real run: transformers then builds an explicit
O(seq^2) attention mask that the real step never allocates. `KnownValues` shadows the fake run
with real computation on small tensors whose inputs are all known: factory ops (`ones_like`,
`arange`, `randint` of a batch) and everything computed from them. A read of such a tensor's
value returns the real value; `real_branches` makes transformers' tracing checks answer as they
answer for real tensors wherever the value is known.
"""

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

# Larger tensors are weights, activations or optimizer state: their values never steer a branch
# in the models seen so far, and computing them for real would allocate what the estimate avoids.
MAX_KNOWN_NUMEL = 1 << 16
_SKIP_NAMESPACES = ("prim", "profiler")


class KnownValues:
    """Real twins of small fake tensors, propagated op by op.

    Args:
        max_numel: tensors with more elements than this are never computed for real.
    """

    def __init__(self, *, max_numel: int = MAX_KNOWN_NUMEL) -> None:
        self.max_numel = max_numel
        self._twins: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def value_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The real twin of `tensor` (a real tensor is its own), or None when its value is unknown."""
        if not isinstance(tensor, FakeTensor):
            return tensor if tensor.device.type != "meta" else None
        return self._twins.get(tensor)

    def knows(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and self.value_of(tensor) is not None

    def propagate(self, func: Any, args: tuple, kwargs: dict, output: Any, output_leaves: list[Any]) -> None:
        """Computes the real twins of `output` (flattened: `output_leaves`) when every tensor input
        of `func` is known and small."""
        outputs = [value for value in output_leaves if isinstance(value, torch.Tensor)]
        mutates = getattr(getattr(func, "_schema", None), "is_mutable", False)
        if not mutates and (not outputs or any(value.numel() > self.max_numel for value in outputs)):
            return
        if getattr(func, "namespace", None) in _SKIP_NAMESPACES:
            return
        inputs = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        if any(not self.knows(value) or value.numel() > self.max_numel for value in inputs):
            if mutates:  # an in-place op on a known tensor with unknown operands: its value is lost
                for value in inputs:
                    self._twins.pop(value, None)
            return
        real_args, real_kwargs = tree_map(
            lambda value: self.value_of(value) if isinstance(value, torch.Tensor) else value, (args, kwargs)
        )
        try:
            with _disable_current_modes(), torch.no_grad():
                real_output = func(*real_args, **real_kwargs)
        except Exception:  # an op that cannot run here for real (e.g. another device's kernel): value stays unknown
            return
        real_leaves = tree_flatten(real_output)[0]
        fake_leaves = output_leaves
        if len(real_leaves) != len(fake_leaves):
            return
        for fake, real in zip(fake_leaves, real_leaves):
            if isinstance(fake, FakeTensor) and isinstance(real, torch.Tensor) and real.shape == fake.shape:
                self._twins[fake] = real

    def scalar(self, tensor: torch.Tensor) -> Any:
        """The Python number `tensor.item()` gives in the real run, or None when unknown."""
        real = self.value_of(tensor)
        if real is None:
            return None
        with _disable_current_modes():
            return real.item()


@contextlib.contextmanager
def real_branches(known: KnownValues) -> Iterator[None]:
    """Makes transformers' `is_tracing(tensor)` false for fake tensors whose values are known.

    transformers asks `is_tracing(tensor)` before reading a value (`padding_mask.all()`); for a
    fake tensor it says yes and takes the branch a compiler would take, which allocates more than
    the real run does. Where `known` holds the value, the branch the real run takes is taken.
    Without transformers imported this does nothing.
    """
    import_utils = sys.modules.get("transformers.utils.import_utils")
    original = getattr(import_utils, "is_fake_tensor", None)
    if original is None:
        yield
        return

    def is_fake_tensor(value: Any) -> bool:
        return original(value) and not known.knows(value)

    import_utils.is_fake_tensor = is_fake_tensor
    try:
        yield
    finally:
        import_utils.is_fake_tensor = original
