"""Per-rank memory of DDP and FSDP2 training, estimated in one process without real ranks.

Neither strategy can run under memwise's fake-tensor estimator directly (DDP needs real ranks,
FSDP2 modules refuse to be deep-copied), so the per-rank step is memwise's single-process
estimate at the per-rank batch, adjusted for what the strategy adds or removes:

- DDP: a full replica plus the Reducer's gradient buckets. The buckets are flat tensors as large as
  the trainable parameters together (bucket_cap_mb=25, the first bucket capped at 1 MiB; the split
  changes how many, not their total), allocated when the model is wrapped and alive for the whole
  run, so they add to every moment of the step, the peak included.
- FSDP2 (`fully_shard` on each block, then the root): parameters, gradients and optimizer state
  are sharded (each parameter's dim 0 padded to a multiple of the ranks); the root's own
  parameters stay unsharded from its forward until the end of backward (torch does not reshard
  the root after forward); and one block is all-gathered (unsharded) while it runs.
"""

import dataclasses
import math
from typing import Any

import torch

from memwise.core.checks import positive_int
from memwise.core.recipe import Recipe
from memwise.core.step import resolve_recipe
from memwise.core.workload import Workload
from memwise.distributed.config import DistStrategy, check_distributed_precision, coerce_strategy
from memwise.distributed.result import RankMemory
from memwise.distributed.worker import rank_recipe
from memwise.distributed.wrap import fsdp_blocks
from memwise.estimate.estimator import Estimate, estimate

DDP_BUCKET_CAP_BYTES = 25 * 2**20
DDP_FIRST_BUCKET_BYTES = 2**20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankEstimate(Estimate):
    """An `Estimate` of the largest rank (its `peak_bytes`), plus every rank.

    Attributes:
        nproc: ranks.
        strategy: `ddp` or `fsdp`.
        ranks: per rank, the estimated peak and categories (`step_ms` None).
        per_rank_peak_bytes: the peaks of `ranks`, by rank.
        single_rank_peak_bytes: memwise's single-process estimate at the per-rank batch, before the
            strategy's adjustments.
    """

    nproc: int
    strategy: str
    ranks: tuple[RankMemory, ...]
    per_rank_peak_bytes: tuple[int, ...]
    single_rank_peak_bytes: int


def shard_bytes(tensor: torch.Tensor, nproc: int) -> int:
    """Bytes of one rank's FSDP2 shard of `tensor`: dim 0 padded up to a multiple of `nproc`, split evenly."""
    if tensor.dim() == 0:
        return tensor.element_size()
    rows = math.ceil(tensor.shape[0] / nproc)
    return rows * math.prod(tensor.shape[1:]) * tensor.element_size()


def ddp_bucket_sizes(parameters: list[torch.Tensor], bucket_cap_bytes: int = DDP_BUCKET_CAP_BYTES,
                     first_bucket_bytes: int = DDP_FIRST_BUCKET_BYTES) -> list[int]:
    """Bytes of each gradient bucket DDP builds at wrap time: parameters in reverse order, the first
    bucket closed past `first_bucket_bytes`, later ones past `bucket_cap_bytes` (one dtype here)."""
    sizes, current, limit = [], 0, first_bucket_bytes
    for parameter in reversed(parameters):
        current += parameter.numel() * parameter.element_size()
        if current >= limit:
            sizes.append(current)
            current, limit = 0, bucket_cap_bytes
    if current:
        sizes.append(current)
    return sizes


def estimate_per_rank(
    workload: Workload, recipe: Recipe | None, nproc: int, strategy: DistStrategy | str, device: str = "cpu", **estimate_kwargs: Any,
) -> RankEstimate:
    """Estimates the per-rank peak of training `workload` on `nproc` ranks with DDP or FSDP2.

    `recipe.batch_size` is the global batch; each rank runs `batch_size / nproc` samples. Every
    rank runs the same shapes, so all ranks get the same estimate.

    Args:
        workload: what to train (its model is not wrapped or changed).
        recipe: the recipe every rank runs.
        nproc: ranks.
        strategy: `ddp` or `fsdp`.
        device: the target device of each rank (see `memwise.estimate`).
        estimate_kwargs: passed on to `memwise.estimate` (budget_bytes, device_memory_bytes, ...).

    Returns:
        A `RankEstimate`: the largest rank's estimate with `ranks` and `per_rank_peak_bytes`.

    Assumptions:
        DDP with its defaults (gradient_as_bucket_view=False, one dtype); FSDP2 with
        reshard_after_forward=True on each block from `memwise.core.blocks.find_blocks`; the
        single-process peak falls where the per-rank one does (backward for a training step).

    Known limitations:
        Collective-library scratch outside PyTorch's allocator (gloo/NCCL buffers) is not counted;
        the reduce-scatter input of the block in backward is not added for FSDP2.
    """
    positive_int(nproc, "nproc")
    strategy = coerce_strategy(strategy)
    recipe = resolve_recipe(workload, recipe)
    check_distributed_precision(recipe)
    local = rank_recipe(recipe, nproc)
    single = estimate(workload, local, device, **estimate_kwargs)
    parameters = list({id(p): p for p in workload.model.parameters() if p.requires_grad}.values())
    full_param_bytes = sum(p.numel() * p.element_size() for p in parameters)
    by_category = dict(single.by_category)
    assumptions = list(single.assumptions)
    if strategy == DistStrategy.DDP:
        buckets = ddp_bucket_sizes(parameters)
        bucket_bytes = sum(buckets)
        peak = single.peak_bytes + bucket_bytes
        by_category["grad"] = by_category.get("grad", 0) + bucket_bytes
        assumptions.append(f"DDP gradient buckets: {len(buckets)} of {buckets} bytes, allocated at wrap time")
    else:
        blocks = fsdp_blocks(workload.model, workload.name)
        sharded = sum(shard_bytes(p, nproc) for p in parameters)
        ratio = sharded / full_param_bytes if full_param_bytes else 0.0
        in_blocks = {id(p) for _, block in blocks for p in block.parameters()}
        root_unsharded = sum(shard_bytes(p, nproc) * nproc for p in parameters if id(p) not in in_blocks)
        block_unsharded = max(sum(shard_bytes(p, nproc) * nproc for p in block.parameters() if p.requires_grad) for _, block in blocks)
        changes = {
            "param": sharded - by_category.get("param", 0),
            "grad": int(by_category.get("grad", 0) * ratio) - by_category.get("grad", 0),
            "optimizer_state": int(by_category.get("optimizer_state", 0) * ratio) - by_category.get("optimizer_state", 0),
            "activation": root_unsharded,  # the root's gathered parameters live from forward to the end of backward
            "temporary": block_unsharded,  # the block gathered while it runs
        }
        for category, change in changes.items():
            by_category[category] = by_category.get(category, 0) + change
        peak = single.peak_bytes + sum(changes.values())
        assumptions.append(f"FSDP2: {len(blocks)} blocks sharded over {nproc} ranks; root parameters "
                           f"({root_unsharded} bytes) unsharded from forward to backward; largest block gathered ({block_unsharded} bytes)")
    ranks = tuple(RankMemory(rank=rank, peak_bytes=peak, by_category=by_category, step_ms=None) for rank in range(nproc))
    fields = {field.name: getattr(single, field.name) for field in dataclasses.fields(Estimate)}
    scale = peak / single.peak_bytes if single.peak_bytes else 1.0
    fields.update(
        peak_bytes=peak, by_category=by_category, batch_size=recipe.batch_size, recipe=recipe,
        low_bytes=int(single.low_bytes * scale), high_bytes=int(single.high_bytes * scale),
        total_bytes=single.total_bytes + (peak - single.peak_bytes), assumptions=tuple(assumptions),
    )
    if fields["budget_bytes"] is not None:
        fields["fits"] = fields["total_bytes"] <= fields["budget_bytes"]
    return RankEstimate(**fields, nproc=nproc, strategy=strategy.value, ranks=ranks,
                        per_rank_peak_bytes=tuple(r.peak_bytes for r in ranks), single_rank_peak_bytes=single.peak_bytes)
