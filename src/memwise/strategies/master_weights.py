"""An optimizer that updates master copies of the parameters and writes them back.

Used for `bf16-weights` (the model holds bf16 parameters, the optimizer fp32 masters) and for
optimizer offload (the masters and the optimizer state live in host memory).
"""

from typing import Any

import torch


class MasterWeightsOptimizer:
    """Steps `inner` on `masters` with the gradients of `params`, then copies the masters back.

    Args:
        pairs: (model parameter, master parameter) pairs; the master may differ in dtype and device.
        inner: an optimizer over the master parameters.
    """

    def __init__(self, pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]], inner: torch.optim.Optimizer) -> None:
        self.pairs = pairs
        self.inner = inner

    @property
    def state(self) -> Any:
        return self.inner.state

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def sync_grads(self) -> None:
        """Copies the model's gradients onto the masters (once per step).

        A GradScaler unscales the gradients of `param_groups`, which are the masters: the step
        runner calls this before `scaler.step` so there are gradients to unscale.
        """
        for param, master in self.pairs:
            if master.grad is None and param.grad is not None:
                master.grad = param.grad.to(device=master.device, dtype=master.dtype)

    def step(self, closure: Any = None) -> Any:
        self.sync_grads()
        result = self.inner.step(closure)
        with torch.no_grad():
            for param, master in self.pairs:
                param.copy_(master)
        for _, master in self.pairs:
            master.grad = None
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param, master in self.pairs:
            for tensor in (param, master):
                if tensor.grad is None:
                    continue
                if set_to_none:
                    tensor.grad = None
                else:
                    tensor.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "masters": [master.detach().clone() for _, master in self.pairs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        with torch.no_grad():
            for (param, master), saved in zip(self.pairs, state["masters"]):
                master.copy_(saved)
                param.copy_(master)
