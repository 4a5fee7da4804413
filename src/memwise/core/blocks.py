"""Finding a model's repeated blocks (transformer layers, residual stages) by structure."""

import torch


def find_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Returns the model's top-level blocks as (qualified name, module).

    The blocks are the entries of the first `nn.ModuleList` (or `nn.Sequential` of two or more
    modules of one class) met in breadth-first order, e.g. a GPT's `transformer.h` or BERT's
    `encoder.layer`. A model without one has its direct children as blocks (e.g. a small CNN).
    """
    queue: list[tuple[str, torch.nn.Module]] = [("", model)]
    while queue:
        prefix, module = queue.pop(0)
        for name, child in module.named_children():
            qualified = f"{prefix}.{name}" if prefix else name
            if _is_block_list(child):
                return [(f"{qualified}.{index}", block) for index, block in child.named_children()]
            queue.append((qualified, child))
    return [(name, child) for name, child in model.named_children() if _has_parameters(child)]


def _is_block_list(module: torch.nn.Module) -> bool:
    children = list(module.children())
    if isinstance(module, torch.nn.ModuleList):
        return len(children) >= 1 and any(_has_parameters(child) for child in children)
    if isinstance(module, torch.nn.Sequential) and len(children) >= 2:
        kinds = {type(child) for child in children}
        return len(kinds) == 1 and _has_parameters(children[0])
    return False


def _has_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters())
