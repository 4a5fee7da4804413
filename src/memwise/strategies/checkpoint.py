"""Activation checkpointing of top-level blocks: full, selective, or every n-th block."""

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

from memwise.core.blocks import find_blocks
from memwise.core.errors import BadInputError
from memwise.core.recipe import CheckpointMode, Recipe
from memwise.core.strategy import Handle, Strategy

_aten = torch.ops.aten
# Outputs worth keeping under selective checkpointing: the expensive ops (matmuls, convolutions,
# attention). Everything else (activations, norms, dropout masks, adds) is recomputed.
SAVED_OPS = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten.convolution.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default, _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_blocks(model: torch.nn.Module, recipe: Recipe) -> list[tuple[str, torch.nn.Module]]:
    """The blocks `recipe.checkpoint` wraps, by qualified name."""
    blocks = find_blocks(model)
    if recipe.checkpoint == CheckpointMode.NONE:
        return []
    if recipe.checkpoint == CheckpointMode.EVERY_N:
        return blocks[:: recipe.checkpoint_every_n]
    if recipe.checkpoint == CheckpointMode.SELECTIVE and recipe.checkpoint_modules:
        wanted = set(recipe.checkpoint_modules)
        chosen = [(name, block) for name, block in model.named_modules() if name and (name in wanted or type(block).__name__ in wanted)]
        if not chosen:
            names = sorted({type(block).__name__ for _, block in blocks} | {name for name, _ in blocks})
            raise BadInputError(
                f"checkpoint_modules: none of {sorted(wanted)} names a module of this model; blocks are: {', '.join(names[:12])}"
            )
        return chosen
    return blocks


class CheckpointStrategy(Strategy):
    """Wraps each chosen block's `forward` in non-reentrant `torch.utils.checkpoint`.

    `selective` passes a policy that keeps matmul, convolution and attention outputs and
    recomputes the rest. `remove()` restores the blocks' `forward` exactly.
    """

    field = "checkpoint"

    def patch_model(self, model: torch.nn.Module, recipe: Recipe, handle: Handle) -> None:
        extra: dict[str, Any] = {}
        if recipe.checkpoint == CheckpointMode.SELECTIVE:
            extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
        for _, block in checkpointed_blocks(model, recipe):
            original = block.forward
            had_instance_forward = "forward" in block.__dict__

            def checkpointed(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return torch.utils.checkpoint.checkpoint(_original, *args, use_reentrant=False, **extra, **kwargs)

            block.forward = functools.wraps(original)(checkpointed)

            def undo(block: torch.nn.Module = block, original: Callable = original, had: bool = had_instance_forward) -> None:
                if had:
                    block.forward = original
                else:
                    del block.forward

            handle.on_remove(undo)
