"""Precision: autocast to bf16/fp16 (fp16 with GradScaler), or bf16 weights with fp32 masters."""

import contextlib

import torch

from memwise.core.recipe import Precision, Recipe
from memwise.core.strategy import Handle, OptimizerBuilder, Strategy
from memwise.strategies.master_weights import MasterWeightsOptimizer

AUTOCAST_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


class PrecisionStrategy(Strategy):
    """`bf16`/`fp16`: autocast around forward and loss (the runner adds a GradScaler for fp16).

    `bf16-weights`: floating parameters and buffers are stored in bf16; the fp32 originals become
    the optimizer's master weights (updated in fp32, copied back after each step); floating inputs
    are cast to bf16 by a forward pre-hook. `remove()` puts the original fp32 tensors back.
    """

    field = "precision"

    def patch_model(self, model: torch.nn.Module, recipe: Recipe, handle: Handle) -> None:
        if recipe.precision != Precision.BF16_WEIGHTS:
            return
        masters: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        seen: set[int] = set()
        for param in model.parameters():
            if id(param) in seen or param.dtype != torch.float32:
                continue
            seen.add(id(param))
            original = param.data
            param.data = original.to(torch.bfloat16)
            masters.append((param, original))
        buffers = []
        for module in model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.dtype == torch.float32:
                    module._buffers[name] = buffer.to(torch.bfloat16)
                    buffers.append((module, name, buffer))
        hook = model.register_forward_pre_hook(_cast_inputs_to_bf16, with_kwargs=True)
        handle.effects.master_weights.extend(masters)

        def undo() -> None:
            hook.remove()
            for param, original in masters:
                param.data = original
            for module, name, buffer in buffers:
                module._buffers[name] = buffer

        handle.on_remove(undo)

    def forward_context(self, recipe: Recipe, device: torch.device, handle: Handle) -> contextlib.AbstractContextManager:
        if recipe.precision in AUTOCAST_DTYPES:
            return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[recipe.precision])
        return contextlib.nullcontext()

    def wrap_optimizer(self, build: OptimizerBuilder, recipe: Recipe, handle: Handle) -> OptimizerBuilder:
        if recipe.precision != Precision.BF16_WEIGHTS:
            return build

        def build_with_masters(params: list[torch.nn.Parameter]) -> MasterWeightsOptimizer:
            originals = {id(param): original for param, original in handle.effects.master_weights}
            pairs = []
            for param in params:
                master = torch.nn.Parameter(originals.get(id(param), param.detach().float()), requires_grad=True)
                pairs.append((param, master))
            handle.effects.optimizer_owned.extend(master for _, master in pairs)
            return MasterWeightsOptimizer(pairs, build([master for _, master in pairs]))

        return build_with_masters


def _cast_inputs_to_bf16(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(value):
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            return value.to(torch.bfloat16)
        if isinstance(value, (tuple, list)):
            return type(value)(cast(item) for item in value)
        if isinstance(value, dict):
            return {key: cast(item) for key, item in value.items()}
        return value

    return cast(args), cast(kwargs)
