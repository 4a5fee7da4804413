"""Choosing the `scaled_dot_product_attention` kernel (math, flash, memory-efficient, cuDNN)."""

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe, SdpaBackend
from memwise.core.strategy import Handle, Strategy

_BACKENDS = {
    SdpaBackend.MATH: SDPBackend.MATH,
    SdpaBackend.FLASH: SDPBackend.FLASH_ATTENTION,
    SdpaBackend.EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
    SdpaBackend.CUDNN: SDPBackend.CUDNN_ATTENTION,
}
_CPU_BACKENDS = (SdpaBackend.AUTO, SdpaBackend.MATH, SdpaBackend.FLASH)


class AttentionStrategy(Strategy):
    """Forces one SDPA backend around forward (only models that call `scaled_dot_product_attention` are affected)."""

    field = "sdpa_backend"

    def forward_context(self, recipe: Recipe, device: torch.device, handle: Handle) -> contextlib.AbstractContextManager:
        backend = recipe.sdpa_backend
        if backend == SdpaBackend.AUTO:
            return contextlib.nullcontext()
        if device.type == "cpu" and backend not in _CPU_BACKENDS:
            raise BadInputError(f"sdpa_backend: {backend.value!r} needs CUDA; on CPU use auto, math or flash")
        return sdpa_kernel([_BACKENDS[backend]])
