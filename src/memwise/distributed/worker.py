"""One rank of `memwise train|profile --nproc N --strategy S`, started by torchrun.

`python -m memwise.distributed CONFIG.json` (what `launch_train` runs under torchrun), or
`memwise train ... --strategy S` typed after a torchrun command (multi-node): both call `run_rank`.
"""

import bisect
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from memwise.core.errors import BadInputError
from memwise.core.recipe import Mode
from memwise.core.step import StepRunner, resolve_recipe
from memwise.core.workload import Workload, split_batch
from memwise.distributed.config import DistributedTrainConfig, DistStrategy
from memwise.distributed.result import DistributedProfile, DistributedTrainResult, RankMemory
from memwise.distributed.wrap import sync_module_states, wrap_model
from memwise.measure.observer import StepObserver
from memwise.measure.tracker import persistent_tensors, record_steps
from memwise.report.atomic import write_atomic, write_atomic_with
from memwise.workloads import load_workload


def local_storage_key(tensor: torch.Tensor) -> int:
    """The allocator key of a tensor's storage; for a DTensor (FSDP2), that of its local shard."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.untyped_storage().data_ptr()


def rank_recipe(recipe, world_size: int):
    """The per-rank recipe: the global `batch_size` split evenly over `world_size` ranks."""
    if recipe.batch_size % world_size:
        raise BadInputError(f"--batch-size: the global batch {recipe.batch_size} does not split evenly over {world_size} ranks; "
                            f"use a multiple of {world_size}")
    local = recipe.batch_size // world_size
    micro = recipe.micro_batch_size
    if micro is not None and (micro > local or local % micro):
        raise BadInputError(f"--micro-batch-size: {micro} must divide the per-rank batch {local} (global {recipe.batch_size} / {world_size} ranks)")
    return recipe.replace(batch_size=local)


def rank_slice(batch: Any, rank: int, world_size: int) -> Any:
    """Rank `rank`'s share of a global batch: the `rank`-th of `world_size` equal parts along dim 0,
    copied so the rank holds only its own samples (as with a DistributedSampler)."""
    from memwise.core.workload import batch_size_of

    part = split_batch(batch, batch_size_of(batch) // world_size)[rank]
    return move_batch_copy(part)


def move_batch_copy(batch: Any) -> Any:
    """A batch whose tensors own their storage (contiguous copies of views)."""
    if isinstance(batch, torch.Tensor):
        return batch.clone()
    if isinstance(batch, dict):
        return {key: move_batch_copy(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch_copy(value) for value in batch)
    return batch


def error_path(result_path: str | None, rank: int) -> Path | None:
    """Where rank `rank` writes why it failed, next to the run's result file."""
    return Path(f"{result_path}.rank{rank}.error.json") if result_path else None


def run_rank(
    config: DistributedTrainConfig, rank: int, world_size: int, local_rank: int,
) -> DistributedTrainResult | DistributedProfile | None:
    """Runs this rank's part of the distributed run (`config.task`); returns the result on rank 0, else None.

    Every rank builds the same workload (same seed, same initial weights), draws the same global
    batch from `make_batch` and keeps its own slice, so the ranks together see the batch a single
    process would. The first `config.measure_steps` steps run under the allocator profiler; the
    wrap itself runs inside it too, so DDP's gradient buckets (allocated at wrap time) and FSDP2's
    shards are counted.
    """
    cuda = config.device == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size)
    try:
        return _run(config, rank, world_size, device)
    except BaseException as error:
        path = error_path(config.result_path, rank)
        if path is not None:
            write_atomic(path, json.dumps({"rank": rank, "type": type(error).__name__, "message": str(error),
                                           "bad_input": isinstance(error, BadInputError)}).encode())
        raise
    finally:
        dist.destroy_process_group()


def _run(
    config: DistributedTrainConfig, rank: int, world_size: int, device: torch.device,
) -> DistributedTrainResult | DistributedProfile | None:
    workload = load_workload(config.spec, config.args)
    recipe = resolve_recipe(workload, config.recipe)
    local_recipe = rank_recipe(recipe, world_size)
    model = workload.model.to(device)
    persistent = persistent_tensors(model)
    rank_workload = Workload(
        model, lambda _: rank_slice(workload.make_batch(recipe.batch_size), rank, world_size),
        workload.loss_fn, workload.optimizer_factory, name=workload.name, default_batch_size=local_recipe.batch_size,
    )
    state: dict[str, Any] = {}
    losses: list[float] = []

    def run_step(step: int, marker: Any) -> None:
        if step == 0:  # the wrap and the optimizer, inside the profiled region
            persistent.clear()  # logged already; holding the tensors would keep FSDP's unsharded originals alive
            state["wrapped"] = wrapped = wrap_model(model, config.strategy, device, world_size, init_sync=False)
            observer = StepObserver(wrapped, local_storage_key)
            observer.marker = marker
            marker("claim", "param", [(local_storage_key(p), None) for p in wrapped.parameters()])
            runner = StepRunner(rank_workload, local_recipe, Mode.TRAIN, wrapped, device,
                                on_phase=observer.on_phase, on_batch=observer.on_batch)
            observer.optimizer = runner.optimizer
            state["runner"], state["observer"] = runner, observer
            return
        state["observer"].marker, state["observer"].step = marker, step - 1
        losses.append(state["runner"].step(state["runner"].make_batch()))

    if config.strategy == DistStrategy.DDP:
        sync_module_states(model)  # DDP's own broadcast, before the measured region (see sync_module_states)
    measured = min(config.measure_steps, config.steps)
    log, step_ms = record_steps(run_step, model, persistent, mode="train", steps=measured + 1, device=device)
    wrapped = state["wrapped"]
    _free_replaced_originals(log, {local_storage_key(t) for t in [*wrapped.parameters(), *wrapped.buffers()]})
    if config.strategy == DistStrategy.DDP:
        # DDP's gradient buckets: made at wrap time, and again when DDP rebuilds them in the order
        # gradients became ready (second step); they live for the whole run.
        _claim_wrap_buffers(log, "grad")
        _claim_live_at_end(log, "grad")
    _add_unseen_frees(log, _fsdp_group_param_bytes(model, world_size) if config.strategy == DistStrategy.FSDP else [])
    breakdown = log.summarize()
    runner = state["runner"]
    runner.on_phase = lambda phase: None
    runner.on_batch = lambda batch: None
    # Checkpoints due during the measured steps are written once they end (a save would show in the profile).
    if any(done % config.checkpoint_every == 0 for done in range(1, measured + 1)) or measured == config.steps:
        _save(config, rank, state["wrapped"], runner.optimizer, measured, losses)
    for step in range(measured, config.steps):
        losses.append(runner.step(runner.make_batch()))
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            _save(config, rank, state["wrapped"], runner.optimizer, step + 1, losses)
    timed = step_ms[2:] if len(step_ms) > 2 else step_ms[1:]
    memory = RankMemory(rank=rank, peak_bytes=breakdown.peak_bytes, by_category=dict(breakdown.by_category),
                        step_ms=statistics.median(timed), state_bytes=_state_bytes(state["wrapped"], runner.optimizer))
    mean_losses = torch.tensor(losses, dtype=torch.float64, device=device)
    dist.all_reduce(mean_losses)
    mean_losses /= world_size
    gathered: list[Any] = [None] * world_size if rank == 0 else None
    dist.gather_object(memory, gathered, dst=0)
    runner.close()
    if rank != 0:
        return None
    ranks = tuple(sorted(gathered, key=lambda item: item.rank))
    per_rank = {"nproc": world_size, "strategy": config.strategy.value, "ranks": ranks,
                "per_rank_peak_bytes": tuple(item.peak_bytes for item in ranks)}
    if config.task == "profile":
        result = DistributedProfile(
            workload=workload.name, mode=Mode.TRAIN, batch_size=recipe.batch_size, recipe=recipe, device=str(device),
            torch_version=torch.__version__, steps=measured, **breakdown.breakdown_fields(), step_ms=memory.step_ms, **per_rank,
        )
    else:
        result = DistributedTrainResult(
            steps_done=config.steps, oom_events=(), final_recipe=recipe, peak_bytes=memory.peak_bytes,
            loss_history=tuple(float(loss) for loss in mean_losses.tolist()), memory=(), **per_rank,
        )
    if config.result_path:
        write_atomic(config.result_path, json.dumps(result.to_dict()).encode())
    return result


def _state_bytes(model: torch.nn.Module, optimizer: Any) -> int:
    """Bytes of the distinct storages of the model's (local) parameters and the optimizer's state."""
    tensors = list(model.parameters()) + [value for state in optimizer.state.values() for value in state.values()
                                          if isinstance(value, torch.Tensor)]
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def _save(config: DistributedTrainConfig, rank: int, model: torch.nn.Module, optimizer: Any, steps_done: int, losses: list[float]) -> None:
    if config.checkpoint_dir is None:
        return
    directory = Path(config.checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"version": 1, "rank": rank, "steps_done": steps_done, "loss_history": list(losses),
               "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    write_atomic_with(directory / f"memwise-train-rank{rank}.pt", lambda handle: torch.save(payload, handle))


def _free_replaced_originals(log: Any, kept_keys: set[int]) -> None:
    """Frees, before the first forward, the storages alive before the wrap that the wrapped model no
    longer holds (FSDP2 replaces each parameter by its shard; the original goes when the wrap drops
    it). Their frees can be missing from the profiler's stream; without this they would stay live."""
    first_forward = next((i for i, event in enumerate(log.events) if event[0] == "phase" and event[1] == "forward"), None)
    if first_forward is None:
        return
    freed = {event[1] for event in log.events[:first_forward] if event[0] == "free"}
    replaced = [event[1] for event, time_ns in zip(log.events[:first_forward], log.times_ns[:first_forward])
                if event[0] == "alloc" and time_ns is None and event[1] not in kept_keys and event[1] not in freed]
    for key in replaced:
        log.events.insert(first_forward, ("free", key))
        log.times_ns.insert(first_forward, log.times_ns[first_forward])


def _fsdp_group_param_bytes(model: torch.nn.Module, world_size: int) -> list[list[int]]:
    """Per FSDP2 group (each block, then the root's own parameters): the bytes of each unsharded
    parameter as FSDP2 allocates it (dim 0 padded to a multiple of the ranks)."""
    from memwise.distributed.estimate import shard_bytes
    from memwise.distributed.wrap import fsdp_blocks

    blocks = [block for _, block in fsdp_blocks(model)]
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    groups = [list(block.parameters()) for block in blocks]
    groups.append([p for p in model.parameters() if id(p) not in in_blocks])
    return [[shard_bytes(p, world_size) * world_size for p in group] for group in groups if group]


def _add_unseen_frees(log: Any, fsdp_groups: list[list[int]]) -> None:
    """Inserts the frees the profiler missed, found by address reuse.

    gloo runs collectives on its own threads, where the profiler records nothing: the input copy its
    collectives make on the calling thread (e.g. reduce-scatter's clone) is freed on a worker
    thread, and so is an FSDP2 all-gather output when gloo's thread drops the last reference to it.
    The allocator cannot hand out a live address, so an allocation at an address the log still
    holds proves the earlier block was freed; so does a block made during the steps that is still
    live, unclaimed, at the end. An all-gather output (as large as one FSDP2 group's unsharded
    parameters) is freed after the copy-out, i.e. once that group's unsharded parameters have been
    allocated after it; any other such block (a collective's own copy, freed when the collective
    ends) at the calling thread's next free of its own.
    """
    live: dict[Any, int] = {}
    free_after: set[int] = set()
    claimed: set[Any] = set()
    first_forward = len(log.events)
    for index, event in enumerate(log.events):
        if event[0] == "alloc":
            if event[1] in live:
                free_after.add(live[event[1]])
            live[event[1]] = index
        elif event[0] == "free":
            live.pop(event[1], None)
        elif event[0] == "claim":
            claimed.update(key for key, _ in event[2])
        elif event[0] == "phase" and event[1] == "forward":
            first_forward = min(first_forward, index)
    # A step leaves nothing behind but gradients, optimizer state (both claimed) and the parameters:
    # a block made during the steps, unclaimed and still live at the end, was freed unseen at an
    # address not handed out again (large blocks are unmapped on free).
    free_after.update(index for key, index in live.items() if index > first_forward and key not in claimed)
    place_after = {index: _copy_out_end(log.events, index, fsdp_groups) for index in free_after}
    inserts: dict[int, list[Any]] = {}
    pending: list[Any] = []  # unseen frees waiting for the calling thread to free something itself
    for index, event in enumerate(log.events):
        if event[0] == "free" and pending:
            inserts.setdefault(index, []).extend(pending)
            pending.clear()
        if index in place_after:
            if place_after[index] is None:
                pending.append(event[1])
            else:
                inserts.setdefault(place_after[index], []).append(event[1])
    events, times = [], []
    for index, (event, time_ns) in enumerate(zip(log.events, log.times_ns)):
        events.append(event)
        times.append(time_ns)
        for key in inserts.get(index, ()):
            events.append(("free", key))
            times.append(time_ns)
    events.extend(("free", key) for key in pending)
    times.extend([times[-1]] * len(pending))
    log.events[:], log.times_ns[:] = events, times


def _copy_out_end(events: list[Any], index: int, fsdp_groups: list[list[int]]) -> int | None:
    """For an FSDP2 all-gather output (a flat block as large as one group's unsharded parameters),
    the index of the allocation that completes that group's unsharded parameters after it: the
    copy-out, after which FSDP2 drops the output. None for any other block."""
    nbytes = events[index][2]
    for sizes in fsdp_groups:
        if sum(sizes) != nbytes:
            continue
        wanted = sorted(sizes)
        for later in range(index + 1, len(events)):
            event = events[later]
            if event[0] == "alloc" and event[2] in wanted:
                wanted.remove(event[2])
                if not wanted:
                    return later
            elif event[0] == "phase":
                break
    return None


def _claim_live_at_end(log: Any, category: str) -> None:
    """Claims the blocks still live, and unclaimed, at the end of the log as `category`.

    A claim is of the block live at its key then: a block allocated later at the same address (DDP's
    rebuilt bucket where the first bucket was, its free unseen on gloo's thread) is a new, unclaimed one.
    """
    live: dict[Any, int] = {}
    claimed: set[Any] = set()
    for index, event in enumerate(log.events):
        if event[0] == "alloc":
            live[event[1]] = index
            claimed.discard(event[1])
        elif event[0] == "free":
            live.pop(event[1], None)
        elif event[0] == "claim":
            claimed.update(key for key, _ in event[2])
    keys = [key for key, index in live.items() if log.times_ns[index] is not None and key not in claimed]
    log.events.append(("claim", category, [(key, None) for key in keys]))
    log.times_ns.append(log.times_ns[-1])


def _claim_wrap_buffers(log: Any, category: str) -> None:
    """Claims the blocks allocated before the first forward and still live then (DDP's gradient
    buckets, made when the model is wrapped) as `category`."""
    first_forward = next((i for i, event in enumerate(log.events) if event[0] == "phase" and event[1] == "forward"), None)
    if first_forward is None:
        return
    live: dict[Any, int] = {}
    for event in log.events[:first_forward]:
        if event[0] == "alloc":
            live[event[1]] = event[2]
        elif event[0] == "free":
            live.pop(event[1], None)
    log.events.insert(first_forward, ("claim", category, [(key, None) for key in live]))
    log.times_ns.insert(first_forward, log.times_ns[first_forward])


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point under torchrun: reads the config file named on the command line, runs this rank,
    and ends the process (see `end_rank_process`); a failure raises as usual."""
    argv = sys.argv[1:] if argv is None else argv
    config = DistributedTrainConfig.from_dict(json.loads(Path(argv[0]).read_text()))
    from memwise.distributed.entry import end_rank_process

    run_rank(config, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    end_rank_process(0)

