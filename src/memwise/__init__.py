"""memwise: make PyTorch training and inference fit the memory you have, and show what every byte costs.

Public names are imported on first use (PEP 562), so `import memwise` and `memwise --help` do not
load torch, transformers and every subsystem up front.
"""

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointMode": "memwise.core.recipe",
    "Mode": "memwise.core.recipe",
    "OffloadMode": "memwise.core.recipe",
    "OptimizerName": "memwise.core.recipe",
    "OptimizerStateDtype": "memwise.core.recipe",
    "OptimizerImpl": "memwise.core.recipe",
    "Precision": "memwise.core.recipe",
    "Recipe": "memwise.core.recipe",
    "SdpaBackend": "memwise.core.recipe",
    "Handle": "memwise.core.strategy",
    "apply_": "memwise.core.strategy",
    "format_bytes": "memwise.core.units",
    "parse_size": "memwise.core.units",
    "Workload": "memwise.core.workload",
    "Estimate": "memwise.estimate.estimator",
    "estimate": "memwise.estimate.estimator",
    "Profile": "memwise.measure.profile",
    "profile": "memwise.measure.profile",
    "TrainResult": "memwise.train",
    "train": "memwise.train",
    "load_workload": "memwise.workloads",
    "export": "memwise.export", "ExportResult": "memwise.export", "offload": "memwise.export.offload", "load": "memwise.export.load",
    "compress": "memwise.compress", "load_compressed": "memwise.compress", "CompressionResult": "memwise.compress",
    "watch": "memwise.measure.watch",
    "WatchResult": "memwise.measure.watch",
    "plan": "memwise.plan", "Plan": "memwise.plan", "find_batch_size": "memwise.plan", "BatchSizeResult": "memwise.plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups find it directly
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")  # a subpackage, e.g. memwise.strategies
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'memwise' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the subpackage `memwise.estimate` (or `memwise.train`) makes the import system
        # set it as an attribute here; the public `memwise.estimate` is the function, as before.
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
