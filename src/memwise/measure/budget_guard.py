"""A memory budget on any device: counts live tensor storages and raises OutOfMemoryError past it.

On CUDA the allocator raises `torch.OutOfMemoryError` when the device is full; on the CPU nothing
does. The guard makes a budget enforceable (and OOM recovery testable) everywhere: a dispatch mode
adds every new output storage to a live total and removes it when the storage dies.

Known limitations:
    It sees tensors, not the allocator: scratch memory inside a fused kernel is not counted, so
    the guard is a lower bound of what the allocator holds (see `memwise profile` for the exact
    figure).
"""

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class BudgetGuard(TorchDispatchMode):
    """Tracks live storage bytes; raises `torch.OutOfMemoryError` when they exceed `budget_bytes`.

    Args:
        budget_bytes: the budget, or None to only track.
    """

    def __init__(self, budget_bytes: int | None = None) -> None:
        super().__init__()
        self.budget_bytes = budget_bytes
        self.live_bytes = 0
        self.peak_bytes = 0
        self._storages: dict[int, tuple[weakref.ref, int]] = {}

    def track(self, tensors: Any) -> None:
        """Counts the storages of `tensors` (e.g. parameters made before the guard was entered)."""
        for value in tree_flatten(tensors)[0]:
            if isinstance(value, torch.Tensor):
                self._add(value.untyped_storage(), check=False)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _add(self, storage: torch.UntypedStorage, *, check: bool) -> None:
        known = self._storages.get(id(storage))
        if known is not None and known[0]() is storage:
            return
        nbytes = storage.nbytes()
        storage_id = id(storage)

        def on_free(_: Any, storage_id: int = storage_id, nbytes: int = nbytes) -> None:
            if self._storages.pop(storage_id, None) is not None:
                self.live_bytes -= nbytes

        self._storages[storage_id] = (weakref.ref(storage, on_free), nbytes)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if check and self.budget_bytes is not None and self.live_bytes > self.budget_bytes:
            raise torch.OutOfMemoryError(
                f"memwise budget guard: {self.live_bytes} bytes of tensors live, over the budget of {self.budget_bytes} bytes"
            )

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        output = func(*args, **(kwargs or {}))
        for value in tree_flatten(output)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self._add(value.untyped_storage(), check=True)
        return output
