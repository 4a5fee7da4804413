"""Wrapping a model for a strategy: DDP, or FSDP2's `fully_shard` on every block and then the root."""

import torch

from memwise.core.blocks import find_blocks
from memwise.core.errors import BadInputError
from memwise.distributed.config import DistStrategy


def fsdp_blocks(model: torch.nn.Module, name: str = "model") -> list[tuple[str, torch.nn.Module]]:
    """The blocks `fully_shard` wraps one by one (see memwise.core.blocks.find_blocks).

    Raises:
        BadInputError: the model has no block with parameters besides the root, so FSDP would
            all-gather the whole model at once and save nothing over DDP.
    """
    blocks = [(block_name, block) for block_name, block in find_blocks(model) if any(True for _ in block.parameters())]
    if not blocks:
        raise BadInputError(
            f"--strategy fsdp: {name} ({type(model).__name__}) has no wrappable blocks (submodules with parameters) "
            "to shard one at a time; use --strategy ddp"
        )
    return blocks


def wrap_model(model: torch.nn.Module, strategy: DistStrategy, device: torch.device, world_size: int) -> torch.nn.Module:
    """Wraps `model` (already on `device`, inside an initialized process group) for `strategy`.

    DDP uses its defaults (bucket_cap_mb=25, the first bucket capped at 1 MiB); FSDP2 shards each
    block and then the root, with `reshard_after_forward=True` (the default).
    """
    from torch.distributed.device_mesh import init_device_mesh

    if strategy == DistStrategy.DDP:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    blocks = fsdp_blocks(model)
    mesh = init_device_mesh(device.type, (world_size,))
    for _, block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)
