"""Offload: optimizer state and saved activations in host memory instead of on the device."""

import contextlib

import torch

from memwise.core.recipe import OffloadMode, Recipe
from memwise.core.strategy import Handle, OptimizerBuilder, Strategy
from memwise.strategies.master_weights import MasterWeightsOptimizer


def _on_device(handle: Handle) -> bool:
    """Whether the model lives on an accelerator (offload means nothing when the device is the host)."""
    return any(param.device.type not in ("cpu", "meta") for param in handle.model.parameters())


class OffloadStrategy(Strategy):
    """`optimizer`: fp32 master weights and the optimizer state live in (pinned) host memory; each
    step copies the gradients to the host, steps there and copies the weights back.
    `activations`: tensors saved for backward are moved to pinned host memory during forward
    (`torch.autograd.graph.save_on_cpu`). `all`: both. On a CPU-only run both are no-ops, noted
    on the handle.
    """

    field = "offload"

    def patch_model(self, model: torch.nn.Module, recipe: Recipe, handle: Handle) -> None:
        if recipe.offload != OffloadMode.NONE and not _on_device(handle):
            handle.notes.append(f"offload={recipe.offload.value}: the model is on the host already, nothing to move")

    def saved_tensors_hooks(self, recipe: Recipe, device: torch.device, handle: Handle) -> contextlib.AbstractContextManager:
        if recipe.offload in (OffloadMode.ACTIVATIONS, OffloadMode.ALL) and device.type == "cuda":
            return torch.autograd.graph.save_on_cpu(pin_memory=True)
        return contextlib.nullcontext()

    def wrap_optimizer(self, build: OptimizerBuilder, recipe: Recipe, handle: Handle) -> OptimizerBuilder:
        if recipe.offload not in (OffloadMode.OPTIMIZER, OffloadMode.ALL) or not _on_device(handle):
            return build

        def build_on_host(params: list[torch.nn.Parameter]):
            pin = torch.cuda.is_available()
            pairs = []
            for param in params:
                host = param.detach().to("cpu", dtype=torch.float32, copy=True)
                pairs.append((param, torch.nn.Parameter(host.pin_memory() if pin else host, requires_grad=True)))
            handle.effects.optimizer_owned.extend(master for _, master in pairs)
            return MasterWeightsOptimizer(pairs, build([master for _, master in pairs]))

        return build_on_host
