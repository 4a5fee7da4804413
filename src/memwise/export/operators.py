"""Which operators a model runs, and in which module: to name the one an exporter cannot handle.

Exporters fail with messages about graph nodes, custom classes or missing kernels, rarely with the
module a user could change. memwise runs the model once eagerly under a dispatch mode that records
every operator together with the innermost module running at the time, then matches the error
against that list.
"""

import dataclasses
import re
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memwise.export.inputs import ModelInputs

# Namespaces every target holds: core ATen and primitives.
_CORE_NAMESPACES = ("aten", "prim", "prims")


@dataclasses.dataclass(frozen=True)
class OperatorUse:
    """An operator (`namespace::name`) and the first module (qualified name and class) that ran it."""

    operator: str
    module: str
    module_class: str

    def describe(self) -> str:
        where = f"module {self.module!r} ({self.module_class})" if self.module else f"the model's own forward ({self.module_class})"
        return f"operator {self.operator} in {where}"


class _Census(TorchDispatchMode):
    def __init__(self, stack: list[tuple[str, str]]) -> None:
        super().__init__()
        self.stack = stack
        self.uses: dict[str, OperatorUse] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = f"{func.namespace}::{func._opname}"
        if name not in self.uses:
            module, module_class = self.stack[-1]
            self.uses[name] = OperatorUse(name, module, module_class)
        return func(*args, **(kwargs or {}))


def operator_census(model: torch.nn.Module, inputs: ModelInputs) -> list[OperatorUse]:
    """Every operator one eager forward runs, with the innermost module that ran it first."""
    stack: list[tuple[str, str]] = [("", _class_name(model))]
    handles = []

    def leave(*_: Any) -> None:  # a forward hook that returned the popped entry would replace the output
        stack.pop()

    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(lambda *_, _n=name, _c=_class_name(module): stack.append((_n, _c))))
        handles.append(module.register_forward_hook(leave, always_call=True))
    census = _Census(stack)
    try:
        with torch.no_grad(), census:
            inputs.call(model)
    finally:
        for handle in handles:
            handle.remove()
    return list(census.uses.values())


def _class_name(module: torch.nn.Module) -> str:
    cls = type(module)
    # torch.ao's dynamic quantized Linear is also called `Linear`: the full path tells them apart.
    return cls.__name__ if cls.__module__.startswith("torch.nn.modules") else f"{cls.__module__}.{cls.__qualname__}"


def blamed_operator(error: BaseException, uses: list[OperatorUse]) -> OperatorUse | None:
    """The operator an export error is about: one the message names, else the first non-core one."""
    text = _error_text(error)
    for use in uses:
        namespace, _, name = use.operator.partition("::")
        if re.search(rf"\b{re.escape(namespace)}(::|\.){re.escape(name)}\b", text):
            return use
    return next((use for use in uses if use.operator.partition("::")[0] not in _CORE_NAMESPACES), None)


def _error_text(error: BaseException) -> str:
    parts = []
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def error_summary(error: BaseException) -> str:
    """The informative last line of an exporter's (often very long) message."""
    for text in reversed(_error_text(error).splitlines()):
        text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
        if text and not text.startswith(("(Refer", "The error above", "If you would like")):
            return f"{type(error).__name__}: {text[:400]}"
    return type(error).__name__
