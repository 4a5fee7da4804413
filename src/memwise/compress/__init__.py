"""Compression with an accuracy guard: prune, quantize, distill, sparse storage (`memwise compress`)."""

import sys
import types
from typing import Any

from memwise.compress.load import load_compressed
from memwise.compress.result import CompressionResult, Method, Objective, Trial
from memwise.compress.search import compress

__all__ = ["CompressionResult", "Method", "Objective", "Trial", "compress", "load_compressed"]


class _CallableModule(types.ModuleType):
    # Importing this subpackage binds `memwise.compress` to the module, shadowing the function of
    # the same name; calling the module calls the function, so `memwise.compress(...)` always works.
    def __call__(self, *args: Any, **kwargs: Any) -> CompressionResult:
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
