"""Per-rank memory of DDP and FSDP2 training, estimated in one process without real ranks.

Neither strategy can run under memwise's fake-tensor estimator directly (DDP needs real ranks,
FSDP2 modules refuse to be deep-copied), so the per-rank step is memwise's single-process
estimate at the per-rank batch, adjusted for what the strategy adds or removes:

- DDP: a full replica plus the Reducer's gradient buckets. The buckets are flat tensors as large as
  the trainable parameters together (bucket_cap_mb=25, the first bucket capped at 1 MiB; the split
  changes how many, not their total), allocated when the model is wrapped and alive for the whole
  run, so they add to every moment of the step, the peak included.
- FSDP2 (`fully_shard` on each block, then the root): the single-process trace of the per-rank
  batch, with module marks where each block's backward starts and ends, is replayed event by
  event as one rank runs it (`fsdp_rank_log`): shards instead of parameters, each all-gather and
  reshard, the backward prefetch, the reduce-scatter inputs FSDP2 keeps until the next
  post-backward, sharded gradients and optimizer state. The peak may fall anywhere, e.g. in
  backward where one block runs, the next is prefetched and the previous one's reduce-scatter
  input is still held. With gradient accumulation (or outside training) a coarser count is
  used: the single-process peak with shards, plus the root's parameters (unsharded from its
  forward to the end of backward) and the largest block gathered.
"""

import dataclasses
import itertools
import math
from typing import Any

import torch

from memwise.core.checks import positive_int
from memwise.core.recipe import Mode, Recipe
from memwise.core.step import resolve_recipe
from memwise.core.workload import Workload
from memwise.distributed.config import DistStrategy, check_distributed_precision, coerce_strategy
from memwise.distributed.result import RankMemory
from memwise.distributed.worker import rank_recipe
from memwise.distributed.wrap import fsdp_blocks
from memwise.estimate.estimator import MAX_PROBE_BYTES, Estimate, estimate, resolve_device, trace_log
from memwise.estimate.op_probe import OpProbe
from memwise.measure.memory_log import ROOT_MODULE, MemoryLog
from memwise.measure.tracker import parameter_owners

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


def _replayable(recipe: Recipe, mode: Mode | str) -> bool:
    """Whether the FSDP2 replay applies: a training step without gradient accumulation (FSDP2
    reduce-scatters every micro-batch's gradients, which the single-process trace does not show)."""
    return Mode(mode) == Mode.TRAIN and (recipe.micro_batch_size is None or recipe.micro_batch_size >= recipe.batch_size)


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
        DDP with its defaults (gradient_as_bucket_view=False, one dtype); the single-process peak
        falls where the per-rank one does. FSDP2 with its defaults (reshard_after_forward=True
        on each block from `memwise.core.blocks.find_blocks`, not on the root; backward
        prefetch of one block; one reduce-scatter input kept), gloo's staging copies on CPU.

    Known limitations:
        Collective-library scratch outside PyTorch's allocator (NCCL buffers) is not counted;
        FSDP2 with gradient accumulation uses the coarser count (see the module docstring).
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
    replayed: dict[str, Any] = {}  # the breakdown of a replayed rank log, when there is one
    if strategy == DistStrategy.DDP:
        buckets = ddp_bucket_sizes(parameters)
        bucket_bytes = sum(buckets)
        peak = single.peak_bytes + bucket_bytes
        by_category["grad"] = by_category.get("grad", 0) + bucket_bytes
        assumptions.append(f"DDP gradient buckets: {len(buckets)} of {buckets} bytes, allocated at wrap time")
    elif _replayable(local, estimate_kwargs.get("mode", Mode.TRAIN)):
        blocks = fsdp_blocks(workload.model, workload.name)
        spec = resolve_device(device, estimate_kwargs.get("device_memory_bytes"))
        probe = OpProbe(max_probe_bytes=MAX_PROBE_BYTES) if spec.kind == "cpu" else None
        log = trace_log(workload, local, Mode.TRAIN, spec, probe, backward_marks={name for name, _ in blocks})
        breakdown = fsdp_rank_log(log, workload.model, blocks, nproc, gloo=spec.kind == "cpu").summarize()
        peak, by_category = breakdown.peak_bytes, dict(breakdown.by_category)
        replayed = breakdown.breakdown_fields()
        assumptions.append(f"FSDP2: {len(blocks)} blocks sharded over {nproc} ranks, replayed event by event on the "
                           "single-process trace (all-gathers, backward prefetch, reduce-scatter inputs kept to the next "
                           f"post-backward{', gloo staging copies' if spec.kind == 'cpu' else ''})")
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
    fields.update(replayed)
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


@dataclasses.dataclass
class _Group:
    """One FSDP2 parameter group (a block, or the root's own parameters) as one rank holds it."""

    name: str
    shard_sizes: list[int]  # each parameter's shard, in bytes
    owners: list[str]  # each parameter's owning module
    unsharded: int  # all parameters all-gathered (dim 0 padded), in bytes: the shards of every rank
    gathered: list[Any] = dataclasses.field(default_factory=list)  # keys of the unsharded parameters, while gathered
    grads: list[Any] = dataclasses.field(default_factory=list)  # keys of the unsharded gradients in this backward
    sharded_grad: Any = None  # key of the reduce-scatter output (the sharded gradients)


def _fsdp_groups(model: torch.nn.Module, blocks: list[tuple[str, torch.nn.Module]], nproc: int) -> list[_Group]:
    """The groups `wrap_model` makes: each block in forward order, then the root's remaining parameters."""
    owners = parameter_owners(model)
    groups, seen = [], set()
    for name, block in blocks:
        params = [p for p in block.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        groups.append((name, params))
    groups.append((ROOT_MODULE, [p for p in model.parameters() if id(p) not in seen and not seen.add(id(p))]))
    result = []
    for name, params in groups:
        sizes = [shard_bytes(p, nproc) for p in params]
        result.append(_Group(name, sizes, [owners.get(id(p), ROOT_MODULE) for p in params], sum(sizes) * nproc))
    return result


def fsdp_rank_log(log: MemoryLog, model: torch.nn.Module, blocks: list[tuple[str, torch.nn.Module]], nproc: int, *, gloo: bool) -> MemoryLog:
    """One rank's log of FSDP2 training, replayed from the single-process log of the per-rank batch.

    `log` must come from `fake_step_log(..., backward_marks=<the block names>)`. What FSDP2 does,
    event by event (reshard_after_forward on the blocks, not on the root; backward prefetch of
    the next block; no forward prefetch without CUDA streams):

    - every parameter is held as its shard (dim 0 padded to a multiple of the ranks);
    - unshard a group: all-gather into one flat output (under gloo, gloo's own output too,
      copied into it), copy out into the group's unsharded parameters, drop the output;
    - the root unshards at the start of forward and reshards at the end of backward; a block
      unshards when its forward starts and reshards when it ends; in backward, when a block's
      backward starts it unshards (unless prefetched) and prefetches the block before it;
    - when a group's backward ends (post-backward; for a block whose inputs need no gradient,
      and for the root, at the end of backward): reshard, copy the unsharded gradients into one
      flat reduce-scatter input and drop them, reduce-scatter into the sharded gradients (gloo
      clones its input meanwhile); the input stays alive until the next post-backward, the last
      one until the end of backward;
    - the optimizer's tensors are as large as the shards.
    """
    groups = _fsdp_groups(model, blocks, nproc)
    by_block = {group.name: group for group in groups}
    root = groups[-1]
    block_order = [group.name for group in groups[:-1]]
    full_to_shard: dict[int, int] = {}
    full_total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        full = p.numel() * p.element_size()
        shard = shard_bytes(p, nproc)
        full_to_shard[full] = shard if full_to_shard.get(full, shard) == shard else -1
        full_total += full
    ratio = sum(sum(g.shard_sizes) for g in groups) / full_total if full_total else 1.0
    # Which allocation each gradient claim names, and its group (claims come at the optimizer phase).
    owner_group = {}
    for group in groups:
        for owner in group.owners:
            owner_group.setdefault(owner, group)
    grad_group: dict[int, _Group] = {}  # event index of a gradient's alloc -> its group
    live_alloc: dict[Any, int] = {}
    for index, event in enumerate(log.events):
        if event[0] == "alloc":
            live_alloc[event[1]] = index
        elif event[0] == "claim" and event[1] == "grad":
            for key, owner in event[2]:
                if key in live_alloc and owner in owner_group:
                    grad_group[live_alloc[key]] = owner_group[owner]
    out = MemoryLog(mode=log.mode, module_names=log.module_names)
    out.notes = list(log.notes)
    counter = itertools.count()

    def new_key() -> tuple[str, int]:  # keys of the blocks FSDP2 adds, unlike the trace's integer keys
        return ("fsdp", next(counter))

    grad_key_group: dict[Any, _Group] = {}
    pending_reduce: list[Any] = []  # reduce-scatter inputs kept until the next post-backward
    phase = "idle"
    started: set[str] = set()
    ended: set[str] = set()

    def keep(event: tuple[Any, ...]) -> None:  # an event of the trace, unchanged
        out.events.append(event)
        out.times_ns.append(None)

    def alloc(nbytes: int, category: str | None = None) -> Any:
        key = new_key()
        out.alloc(key, nbytes, category=category)
        return key

    def unshard(group: _Group) -> None:
        if group.gathered or not group.shard_sizes:
            return
        output = alloc(group.unsharded)
        if gloo:  # gloo gathers into its own tensor, copies it into the output, drops it
            out.free(alloc(group.unsharded))
        group.gathered = [alloc(size * nproc) for size in group.shard_sizes]
        out.free(output)

    def reshard(group: _Group) -> None:
        for key in group.gathered:
            out.free(key)
        group.gathered = []

    def post_backward(group: _Group) -> None:
        if group.name in ended:
            return
        ended.add(group.name)
        reshard(group)
        for key in pending_reduce:
            out.free(key)
        pending_reduce.clear()
        if not group.grads:
            return
        reduce_input = alloc(group.unsharded)
        for key in group.grads:
            out.free(key)
        group.grads = []
        group.sharded_grad = alloc(sum(group.shard_sizes), "grad")
        if gloo:
            out.free(alloc(group.unsharded))  # gloo's clone of the input, for the collective's life
        pending_reduce.append(reduce_input)

    for group in groups:  # the shards, alive before the steps
        for size, owner in zip(group.shard_sizes, group.owners):
            out.preexisting(new_key(), size, "param", owner)
    for index, event in enumerate(log.events):
        kind = event[0]
        if kind == "alloc" and event[3] == "param" and event[4] is not None and log.times_ns[index] is None:
            continue  # a full parameter: replaced by its shard above
        if kind == "alloc" and index in grad_group:
            keep(event)
            grad_group[index].grads.append(event[1])
            grad_key_group[event[1]] = grad_group[index]
            continue
        if kind == "alloc" and phase == "optimizer":  # optimizer state and scratch: as large as the shards
            mapped = full_to_shard.get(event[2], -1)
            if mapped < 0:  # a scalar (a step count) stays; anything else scales with the shards
                mapped = event[2] if event[2] <= 16 else int(event[2] * ratio)
            keep((*event[:2], mapped, *event[3:]))
            continue
        if kind == "free" and event[1] in grad_key_group:
            group = grad_key_group.pop(event[1])
            if event[1] in group.grads:  # freed before its group's post-backward
                group.grads.remove(event[1])
                out.free(event[1])
            elif group.sharded_grad is not None:  # zero_grad: the sharded gradients go with the first
                out.free(group.sharded_grad)
                group.sharded_grad = None
            continue
        if kind == "phase":
            if event[1] == "optimizer" and phase == "backward":  # the end of backward: FSDP2's final callback
                for name in reversed(block_order):
                    post_backward(by_block[name])
                post_backward(root)
                for key in pending_reduce:
                    out.free(key)
                pending_reduce.clear()
            keep(event)
            phase = event[1]
            if phase == "forward":
                started.clear()
                ended.clear()
                unshard(root)
            elif phase == "backward" and block_order:  # the root's pre-backward prefetches the last block
                unshard(by_block[block_order[-1]])
            continue
        if kind == "enter" and phase == "forward" and event[1] in by_block:
            keep(event)
            unshard(by_block[event[1]])
            continue
        if kind == "exit" and phase == "forward" and event[1] in by_block:
            reshard(by_block[event[1]])
        if kind == "mark":
            if phase != "backward" or (index > 0 and log.events[index - 1][0] == "mark"):
                continue
            # One gradient can end a block's backward and start the previous block's: the post-backward
            # (an autograd node on the block's inputs) runs before the hooks on that gradient's tensor.
            marks = list(itertools.takewhile(lambda other: other[0] == "mark", itertools.islice(log.events, index, None)))
            for label, name in sorted(((mark[1], mark[2]) for mark in marks), key=lambda mark: mark[0] != "backward_end"):
                if label == "backward_end" and name in started:
                    post_backward(by_block[name])
                elif label == "backward_start" and name not in started:
                    started.add(name)
                    unshard(by_block[name])
                    position = block_order.index(name)
                    if position > 0:
                        unshard(by_block[block_order[position - 1]])  # backward prefetch
            continue
        keep(event)
    return out
