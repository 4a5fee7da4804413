"""What a step tells the memory log besides allocations: phases and which storages hold what."""

from collections.abc import Callable
from typing import Any

import torch

from memwise.core.workload import batch_tensors
from memwise.measure.tracker import parameter_owners

Marker = Callable[..., None]


class StepObserver:
    """Callbacks for `StepRunner` that report phases and claims (input, grad, optimizer_state).

    Args:
        model: the module the steps run on.
        key_of: the allocation key of a tensor's storage in the log (a data pointer when
            measuring, a synthetic id when estimating).
    """

    def __init__(self, model: torch.nn.Module, key_of: Callable[[torch.Tensor], Any]) -> None:
        self.params = list(model.parameters())
        self.owners = parameter_owners(model)
        self.key_of = key_of
        self.marker: Marker | None = None
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None

    def on_batch(self, batch: Any) -> None:
        if self.marker is not None:
            self.marker("claim", "input", [(self.key_of(t), None) for t in batch_tensors(batch)])

    def on_phase(self, phase: str) -> None:
        marker = self.marker
        if marker is None:
            return
        if phase == "optimizer":
            grads = [(self.key_of(p.grad), self.owners.get(id(p))) for p in self.params if p.grad is not None]
            marker("claim", "grad", grads)
        if phase == "idle" and self.optimizer is not None:
            state = [
                (self.key_of(value), self.owners.get(id(param)))
                for param, param_state in self.optimizer.state.items()
                for value in param_state.values()
                if isinstance(value, torch.Tensor)
            ]
            marker("claim", "optimizer_state", state)
        marker("phase", phase, self.step)
