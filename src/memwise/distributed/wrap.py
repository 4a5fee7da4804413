"""Wrapping a model for a strategy: DDP, or FSDP2's `fully_shard` on every block and then the root."""

import torch
import torch.distributed as dist

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


def sync_module_states(model: torch.nn.Module) -> None:
    """Copies rank 0's parameters and buffers to every rank: what DDP does when it wraps, done
    beforehand so that the wrap itself (measured) holds no broadcast buffer. Under gloo, a
    receiving rank's flat broadcast buffer is sometimes freed on gloo's thread, unseen by the
    profiler, which would leave it counted as live for the whole run."""
    from torch.distributed.utils import _sync_module_states, _verify_param_shape_across_processes

    _verify_param_shape_across_processes(dist.group.WORLD, [p for p in model.parameters() if p.requires_grad])
    _sync_module_states(model, dist.group.WORLD, broadcast_bucket_size=250 * 2**20, src=0, params_and_buffers_to_ignore=set())


def wrap_model(
    model: torch.nn.Module, strategy: DistStrategy, device: torch.device, world_size: int, *, init_sync: bool = True,
) -> torch.nn.Module:
    """Wraps `model` (already on `device`, inside an initialized process group) for `strategy`.

    DDP uses its defaults (bucket_cap_mb=25, the first bucket capped at 1 MiB); with
    `init_sync=False` it skips its broadcast of rank 0's states (call `sync_module_states` first).
    FSDP2 shards each block and then the root, with `reshard_after_forward=True` (the default).
    """
    from torch.distributed.device_mesh import init_device_mesh

    if strategy == DistStrategy.DDP:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, init_sync=init_sync)
    from torch.distributed.fsdp import fully_shard

    blocks = fsdp_blocks(model)
    mesh = init_device_mesh(device.type, (world_size,))
    for _, block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)
