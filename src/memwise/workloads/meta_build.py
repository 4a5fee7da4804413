"""Building a workload's model without allocating its weights (for `estimate`).

While the factory runs, every parameter a module registers is moved to the meta device at once
(the technique of Accelerate's `init_empty_weights`): a layer's `torch.empty` weight is replaced
before its initializer runs, so initialization does nothing and no weight is ever filled. Buffers
stay real (they are small and their values can matter, e.g. position ids). The estimator replaces
the meta parameters by fake tensors of the same shapes and dtypes.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from memwise.core.errors import WorkloadError
from memwise.core.workload import Workload
from memwise.workloads.optional import first_line

META_NOTE = "the model was built with its parameters on the meta device: no weight was allocated or initialized"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within the block, parameters registered on any module are moved to the meta device."""
    original = torch.nn.Module.register_parameter

    def register_parameter(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is None or param.device.type == "meta":
            return
        registered = module._parameters[name]
        meta = torch.nn.Parameter(registered.to("meta"), requires_grad=registered.requires_grad)
        if type(registered) is not torch.nn.Parameter:
            try:
                meta = type(registered)(registered.to("meta"), requires_grad=registered.requires_grad)
            except TypeError:
                pass  # a subclass with other constructor arguments: a plain meta Parameter has the shape
        meta.__dict__.update(registered.__dict__)  # attributes set on the parameter (e.g. by transformers)
        module._parameters[name] = meta

    torch.nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def build_without_weights(build: Callable[[], Any], spec: str) -> tuple[Any, str]:
    """Runs `build` with parameters on the meta device; falls back to a normal build where it cannot.

    Returns:
        (what `build` returned, a sentence for the estimate's assumptions saying how it was built).
    """
    try:
        with parameters_on_meta():
            result = build()
    except WorkloadError:
        raise  # the user's input is wrong: building for real would fail the same way
    except Exception as error:  # noqa: BLE001  (any failure of a factory that cannot build on meta)
        reason = f"{type(error).__name__}: {first_line(error)}"
        result = build()
        return result, (
            f"the workload could not be built with its parameters on the meta device ({reason}); "
            "it was built with real weights, which this process allocated"
        )
    if isinstance(result, Workload):
        real = [name for name, param in result.model.named_parameters() if param.device.type != "meta"]
        if real:
            # e.g. a factory that loads a state dict with assign=True: such parameters are real
            return result, f"{len(real)} parameters were created outside a module's registration (e.g. {real[0]}) and were allocated"
    return result, META_NOTE
