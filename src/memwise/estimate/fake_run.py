"""Running a step on fake tensors and writing the memory log it would produce, without allocating.

The model's parameters and buffers are replaced by fake tensors of the same shapes and dtypes (a
deep copy whose memo maps every real or meta tensor to its fake twin, so no weight is copied and
tied weights stay tied). A dispatch mode sees every op: a new output storage is an allocation, the
death of its storage object a free. Scratch memory of opaque CPU kernels is added from `OpProbe`.
"""

import contextlib
import copy
import itertools
import weakref
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memwise.core.errors import SymbolicExecutionError
from memwise.core.recipe import Mode, OffloadMode, Recipe
from memwise.core.step import StepRunner
from memwise.core.workload import Workload
from memwise.estimate.cuda_autocast import close_weight_cast_cache, cuda_autocast_rules, open_weight_cast_cache
from memwise.estimate.block_stack import BlockTagger, TaggedLog
from memwise.estimate.known_values import KnownValues, real_branches
from memwise.estimate.op_probe import NO_PROBE, OpProbe
from memwise.measure.memory_log import HOST, ROOT_MODULE, MemoryLog
from memwise.measure.observer import StepObserver
from memwise.measure.tracker import ModuleMarks, module_names, persistent_tensors

_ITEM = torch.ops.aten._local_scalar_dense.default
_COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
_CPU_KERNEL = torch._C.DispatchKey.CPU
_ADD = torch.ops.aten.add.Tensor


class FakeAllocations(TorchDispatchMode):
    """Writes an allocation for every new storage and a free when it dies, into `log`.

    Args:
        log: where events go.
        round_size: maps a storage's bytes to the allocator's block size (identity on CPU).
        probe: measures hidden scratch of CPU kernels; None to skip.
    """

    def __init__(self, log: MemoryLog, *, round_size: Callable[[int], int], probe: OpProbe | None) -> None:
        super().__init__()
        self.log = log
        self.round_size = round_size
        self.probe = probe
        self.keys: dict[int, tuple[int, weakref.ref]] = {}
        self.counter = itertools.count(1)
        self.phase = "idle"
        self.module_stack: list[str] = []
        self._pending_accumulation: tuple[int, weakref.ref, int, weakref.ref] | None = None
        self.offload_optimizer = False
        self.host_scope = False
        self.known = KnownValues()
        self.tagger: BlockTagger | None = None

    def settle_accumulation(self) -> None:
        """Turns the last backward `add` into the in-place add the real run makes, if it was one.

        Autograd's `InputBuffer` sums two gradients for one tensor in place when it holds the
        last reference to the first and to its storage and the first is contiguous (so not when
        it is a view, such as the transposed matmul gradient of a tied weight in fp32); under a Python dispatch mode the reference counts are higher, so it always adds out
        of place and drops the first right after. When the first gradient was contiguous and died
        before the next op, the sum takes over its allocation: the sum's own allocation and the
        first one's free are dropped from the log, as the real run makes none.
        """
        pending, self._pending_accumulation = self._pending_accumulation, None
        if pending is None:
            return
        alloc_index, first_ref, first_key, sum_ref = pending
        total = sum_ref()
        if first_ref() is not None or total is None:
            return
        events = self.log.events
        free_index = next((i for i in range(len(events) - 1, alloc_index, -1) if events[i] == ("free", first_key)), None)
        if free_index is None:
            return
        self.log.remove_event(free_index)
        self.log.remove_event(alloc_index)
        self._register(total, preexisting=None, key=first_key)

    def key_of(self, tensor: torch.Tensor) -> int:
        """The log key of `tensor`'s storage (registering it as allocated-before-logging if unseen)."""
        storage = tensor.untyped_storage()
        known = self.keys.get(id(storage))
        if known is not None and known[1]() is storage:
            return known[0]
        return self._register(storage, preexisting=None)

    def track_preexisting(self, tensor: torch.Tensor, category: str, module: str) -> None:
        storage = tensor.untyped_storage()
        known = self.keys.get(id(storage))
        if known is not None and known[1]() is storage:
            return
        self._register(storage, preexisting=(category, module))

    def _register(
        self, storage: torch.UntypedStorage, preexisting: tuple[str, str] | None, nbytes: int | None = None, key: int | None = None,
    ) -> int:
        """Starts tracking `storage`: logs its allocation, or with `key` takes over that live allocation."""
        adopted = key is not None
        key = next(self.counter) if key is None else key
        storage_id = id(storage)
        log, keys = self.log, self.keys

        def on_free(_: Any, key: int = key, storage_id: int = storage_id) -> None:
            if keys.get(storage_id, (None,))[0] == key:
                del keys[storage_id]
            log.free(key)

        keys[storage_id] = (key, weakref.ref(storage, on_free))
        if adopted:
            return key
        nbytes = storage.nbytes() if nbytes is None else nbytes
        nbytes = self.round_size(nbytes) if nbytes else 0
        if preexisting is not None:
            log.preexisting(key, nbytes, *preexisting)
        else:
            on_host = self.host_scope or (self.offload_optimizer and self.phase == "optimizer")
            log.alloc(key, nbytes, category=HOST if on_host else None)
        return key

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _ITEM:
            value = self.known.scalar(args[0])
            if value is not None:
                return value
            if self.phase in ("optimizer", "idle"):
                return 1.0 if args[0].dtype.is_floating_point else 1  # optimizer bookkeeping: value irrelevant
            raise self._error(func, "reads a tensor's value (.item() / int() / bool() on a tensor)")
        if getattr(func, "namespace", None) == "aten" and _runs_decomposed(func):
            # Outside autograd (inference mode) composite ops such as linear or cross_entropy reach
            # this mode whole; run their decomposition, as the real dispatcher does, so the
            # intermediates they allocate are seen one by one. An op that also has a device kernel
            # (silu_backward) runs that kernel, whose one output and scratch the probe sees.
            with self:
                output = func.decompose(*args, **kwargs)
            if output is not NotImplemented:
                return output
        try:
            output = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException) as error:
            raise self._error(func, f"has an output shape that depends on tensor values ({type(error).__name__})") from None
        except UnsupportedOperatorException as error:
            raise self._error(func, f"has no fake-tensor implementation ({error})") from None
        self.settle_accumulation()
        leaves = tree_flatten(output)[0]
        self.known.propagate(func, args, kwargs, output, leaves)
        new_storages = []
        for position, value in enumerate(leaves):
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                known = self.keys.get(id(storage))
                if (known is None or known[1]() is not storage) and all(storage is not s for _, s in new_storages):
                    new_storages.append((position, storage))
        probed = self.probe.measure(func, args, kwargs, sum(s.nbytes() for _, s in new_storages)) if self.probe else NO_PROBE
        real_sizes = probed.output_storage_bytes if len(probed.output_storage_bytes) == len(leaves) else None
        tagger = self.tagger
        # outputs the real kernel allocates after its internal peak (oneDNN's convolution backward
        # fills a private weight-gradient buffer, then copies it into the output) are logged after
        # the scratch, so the peak holds what the real one holds
        late = set(probed.late_outputs) if real_sizes else set()
        self._register_outputs(func, args, [item for item in new_storages if item[0] not in late], real_sizes)
        if tagger is not None:
            tagger.output_block = tagger.block_of_output(func, args, self._known_key, None) if probed.scratch_bytes else None
        if (func is _ADD and self.phase == "backward" and new_storages and not late and _same_layout(args[0], leaves[0])
                and _owns_storage(args[0])):
            self._pending_accumulation = (
                len(self.log.events) - 1, weakref.ref(args[0].untyped_storage()), self.key_of(args[0]),
                weakref.ref(leaves[0].untyped_storage()),
            )
        if probed.scratch_bytes:
            key = next(self.counter)
            self.log.alloc(key, self.round_size(probed.scratch_bytes))
            self.log.free(key)
            if tagger is not None:
                tagger.output_block = None
        self._register_outputs(func, args, [item for item in new_storages if item[0] in late], real_sizes)
        return output

    def _register_outputs(
        self, func: Any, args: tuple, storages: list[tuple[int, torch.UntypedStorage]], real_sizes: tuple[int, ...] | None,
    ) -> None:
        """Logs the allocation of new output storages (position in the flattened output, storage)."""
        for position, storage in storages:
            if self.tagger is not None:
                self.tagger.output_block = self.tagger.block_of_output(func, args, self._known_key, position)
            # the real kernel may size an output (e.g. a oneDNN workspace) unlike its fake twin
            self._register(storage, preexisting=None, nbytes=real_sizes[position] if real_sizes else None)

    def _known_key(self, tensor: torch.Tensor) -> int | None:
        """The log key of `tensor`'s storage, None when it is not tracked (never registers it)."""
        storage = tensor.untyped_storage()
        known = self.keys.get(id(storage))
        return known[0] if known is not None and known[1]() is storage else None

    def _error(self, func: Any, what: str) -> SymbolicExecutionError:
        module = self.module_stack[-1] if self.module_stack else ROOT_MODULE
        return SymbolicExecutionError(
            f"cannot estimate symbolically: op {func} in module {module!r} ({self.phase}) {what}; "
            "measure this workload with `memwise profile` instead"
        )


def _saved_tensors_on_host(recorder: FakeAllocations) -> contextlib.AbstractContextManager:
    """Plays `torch.autograd.graph.save_on_cpu`: each saved tensor is copied to the host in forward
    and back to the device when backward needs it."""

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        recorder.host_scope = True
        try:
            return tensor.detach().clone()
        finally:
            recorder.host_scope = False

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed.clone())


def _runs_decomposed(func: Any) -> bool:
    """Whether the real dispatcher runs `func`'s CompositeImplicitAutograd decomposition: only when
    no device kernel is registered (the CPU kernel stands for the device's: a CUDA target is traced
    on CPU fakes, and native ops with a CPU kernel have a CUDA one too)."""
    return func.has_kernel_for_dispatch_key(_COMPOSITE) and not func.has_kernel_for_dispatch_key(_CPU_KERNEL)


def _owns_storage(tensor: torch.Tensor) -> bool:
    """Whether `InputBuffer` could repurpose `tensor` for an in-place sum: contiguous, and not a
    view (a view's storage is also held by its base, e.g. the transposed gradient of a tied
    weight in fp32)."""
    return tensor.is_contiguous() and not tensor._is_view()


def _same_layout(first: Any, second: Any) -> bool:
    return (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor) and first.shape == second.shape
            and first.dtype == second.dtype and first.untyped_storage().nbytes() == second.untyped_storage().nbytes())


def fake_model(model: torch.nn.Module, fake_mode: FakeTensorMode) -> torch.nn.Module:
    """A structural copy of `model` whose parameters and buffers are fake CPU tensors.

    Real weights are never copied: the deep copy's memo maps each tensor to its fake twin. Works
    for models built on the meta device.
    """
    memo: dict[int, Any] = {}
    with fake_mode:
        for param in model.parameters():
            if id(param) not in memo:
                fake = torch.empty_strided(param.shape, param.stride(), dtype=param.dtype, device="cpu")
                memo[id(param)] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for buffer in model.buffers():
            if id(buffer) not in memo:
                memo[id(buffer)] = torch.zeros_like(buffer, device="cpu") if buffer.device.type == "meta" else fake_mode.from_tensor(buffer)
    return copy.deepcopy(model, memo)


def fake_step_log(
    workload: Workload,
    recipe: Recipe,
    mode: Mode,
    *,
    steps: int,
    round_size: Callable[[int], int],
    probe: OpProbe | None,
    optimizer_foreach: bool | None = None,
    cuda_autocast: bool = False,
    offload_to_host: bool = False,
    blocks: BlockTagger | None = None,
    backward_marks: Collection[str] = (),
) -> MemoryLog:
    """Runs `steps` steps of `workload` on fake tensors; returns the memory log they would write.

    With `cuda_autocast`, autocast regions follow CUDA's op lists instead of the CPU's (the whole
    step is inside the rules, so checkpointed blocks recompute under them too). With
    `offload_to_host` (a GPU target), the recipe's `offload` is played as on a GPU: the optimizer
    step's allocations, or the copies of tensors saved for backward, are logged as host memory.
    With `blocks`, the model runs with the first blocks of its stack only and every event is
    tagged with its block (see `block_stack.stacked_step_log`). For each module named in
    `backward_marks`, the log marks where its backward starts (`backward_start`: a gradient of its
    output is ready, where FSDP2's pre-backward runs) and ends (`backward_end`: a gradient of an
    input that requires one is ready, where FSDP2's post-backward runs).
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with blocks.truncated(workload.model) if blocks else contextlib.nullcontext():
        model = fake_model(workload.model, fake_mode)
    with fake_mode:  # strategies (bf16 weights, master copies) change the fake model before logging starts
        runner = StepRunner(workload, recipe, mode, model, torch.device("cpu"), optimizer_foreach=optimizer_foreach)
    if blocks is not None:
        log = TaggedLog(blocks, mode=mode.value, module_names=module_names(model))
        blocks.attach(model)
    else:
        log = MemoryLog(mode=mode.value, module_names=module_names(model))
    recorder = FakeAllocations(log, round_size=round_size, probe=probe)
    recorder.tagger = blocks
    if blocks is not None:
        blocks.module_stack, blocks.phase = recorder.module_stack, lambda: recorder.phase
    if not offload_to_host:  # a GPU target plays offload and allocator settings itself: notes about this CPU would mislead
        log.notes.extend(runner.handle.notes)
    for tensor, category, owner in persistent_tensors(model, runner.handle.effects.optimizer_owned):
        recorder.track_preexisting(tensor, category, owner)
    observer = StepObserver(model, recorder.key_of)

    def on_phase(phase: str) -> None:
        recorder.settle_accumulation()
        if cuda_autocast:
            # CUDA autocast caches each parameter's cast for its region, which the runner opens
            # around forward and loss: from the "forward" phase to the next phase. The casts die
            # between passes (so each free belongs to its parameter's block).
            recorder.phase = "idle"
            close_weight_cast_cache()
            if phase == "forward":
                open_weight_cast_cache()
        recorder.phase = phase
        observer.on_phase(phase)

    def marker(method: str, *args: Any) -> None:
        if method == "enter":
            recorder.module_stack.append(args[0])
        elif method == "exit" and recorder.module_stack:
            recorder.module_stack.pop()
        getattr(log, method)(*args)

    hooks = ModuleMarks(model, lambda name: marker("enter", name), lambda name: marker("exit", name))
    backward_hooks = _backward_marks(model, backward_marks, log)
    observer.marker = marker
    try:
        runner.on_phase, runner.on_batch = on_phase, observer.on_batch
        observer.optimizer = runner.optimizer
        rules = cuda_autocast_rules() if cuda_autocast else contextlib.nullcontext()
        offload = recipe.offload if offload_to_host else OffloadMode.NONE
        recorder.offload_optimizer = offload in (OffloadMode.OPTIMIZER, OffloadMode.ALL)
        saved_to_host = _saved_tensors_on_host(recorder) if offload in (OffloadMode.ACTIVATIONS, OffloadMode.ALL) else contextlib.nullcontext()
        with rules, fake_mode, recorder, saved_to_host, real_branches(recorder.known):
            for step in range(steps):
                observer.step = step
                log.phase("idle", step)
                runner.step()
            del runner
            observer.optimizer = None
    finally:
        hooks.remove()
        for handle in backward_hooks:
            handle.remove()
        if cuda_autocast:
            close_weight_cast_cache()
        if blocks is not None:
            blocks.detach()
    return log


def _backward_marks(model: torch.nn.Module, names: Collection[str], log: MemoryLog) -> list[Any]:
    """Forward hooks on the modules named in `names` that hook the gradients of their outputs and
    inputs, to mark in `log` where each module's backward starts and ends."""
    handles = []
    for name, module in model.named_modules():
        if name not in names:
            continue

        def hook_tensors(tensors: Any, label: str, name: str = name) -> None:
            if not torch.is_grad_enabled():
                return
            for tensor in tree_flatten(tensors)[0]:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(lambda _grad, label=label, name=name: log.mark(label, name))

        handles.append(module.register_forward_pre_hook(
            lambda _m, args, kwargs, hook=hook_tensors: hook((args, kwargs), "backward_end"), with_kwargs=True))
        handles.append(module.register_forward_hook(lambda _m, _args, output, hook=hook_tensors: hook(output, "backward_start")))
    return handles
