"""Unstructured magnitude pruning made permanent: the smallest weights become exact zeros.

`torch.nn.utils.prune` only adds a mask next to the weight, so the model grows. Here the mask is
applied during recovery (so distillation cannot revive pruned weights) and then removed with
`prune.remove`, leaving plain weights with zeros. Nothing is smaller until the weights are stored
sparse: `load.serialize(..., sparse=True)` stores a weight as CSR only where that is really
smaller (below about 50% density with fp32 values and int32 indices).
"""

import copy
from collections.abc import Callable

from torch import nn
from torch.nn.utils import prune


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [
        (module, "weight") for module in model.modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and module.weight.numel() >= 256
    ]


def prune_magnitude(
    model: nn.Module,
    sparsity: float,
    *,
    recover: Callable[[nn.Module], object] | None = None,
) -> nn.Module:
    """A copy of `model` with the `sparsity` fraction of its Conv/Linear weights (global L1) set to zero.

    Args:
        model: the float model (not modified).
        sparsity: fraction of the prunable weights to zero, in [0, 1).
        recover: called with the masked model (e.g. distillation) before the masks are made permanent.
    """
    pruned = copy.deepcopy(model)
    targets = prunable_weights(pruned)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=float(sparsity))
    if recover is not None:
        recover(pruned)
    for module, name in targets:
        prune.remove(module, name)
    return pruned.eval()


def zero_fraction(model: nn.Module) -> float:
    """Fraction of exact zeros among the prunable weights."""
    weights = [module.weight for module, _ in prunable_weights(model)]
    total = sum(weight.numel() for weight in weights)
    zeros = sum(int((weight == 0).sum()) for weight in weights)
    return zeros / total if total else 0.0
