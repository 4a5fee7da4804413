"""Estimating a stack of identical blocks from a trace of three of them.

A transformer's step repeats the same events for each of its N blocks: forward block by block,
backward in reverse, the optimizer over each block's parameters. Tracing all N on fake tensors
costs time proportional to N; here the step is traced with the first three blocks only (first,
middle, last), every event is tagged with the block it belongs to, and the log of the full
stack is written by repeating the middle block's events N-2 times, with its allocations renamed
per copy and every free or claim pointed at the copy it belongs to. The result is the event
stream a full trace writes, so the summary and the CUDA allocator replay are the same bytes
(tests/estimate/test_block_stack.py compares them with full traces).

Where the tagged trace does not have that shape (blocks interleaved, an op across blocks with
scratch memory, blocks that differ in attributes), `stacked_step_log` returns None with the reason
and the caller traces the full model.
"""

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from memwise.measure.memory_log import MemoryLog

TEMPLATE_BLOCKS = 3  # first, middle, last
MIN_BLOCKS = 6  # below this a full trace is as cheap
_MIDDLE = 1
# Outside forward and backward no block runs: an event belongs to the block of what it touches.
_BETWEEN_PASSES = ("optimizer", "idle")
_TAG = "memwise_block"
# Attributes that number a block (differ between identical blocks by design).
_INDEX_ATTRIBUTE = re.compile(r"(^|_)(idx|index|id|number|num)$|layer_idx|layer_id|block_idx")


@dataclasses.dataclass(frozen=True)
class BlockStack:
    """The longest `nn.ModuleList` of identical blocks in a model.

    Attributes:
        path: the list's qualified name (e.g. `model.layers`).
        count: how many blocks it holds.
    """

    path: str
    count: int

    def block_of(self, module_name: str | None) -> int | None:
        """Index of the block that `module_name` is (or is inside), None outside the stack."""
        if not module_name or not module_name.startswith(self.path + "."):
            return None
        head = module_name[len(self.path) + 1:].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def rename(self, module_name: str | None, block: int) -> str | None:
        """`module_name` moved from its block to `block` (unchanged outside the stack)."""
        if self.block_of(module_name) is None:
            return module_name
        rest = module_name[len(self.path) + 1:].split(".", 1)
        return ".".join([self.path, str(block), *rest[1:]])


def find_block_stack(model: torch.nn.Module) -> BlockStack | None:
    """The longest ModuleList of at least `MIN_BLOCKS` structurally identical blocks, or None."""
    best: BlockStack | None = None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < MIN_BLOCKS:
            continue
        signatures = {_signature(block) for block in module}
        if len(signatures) == 1 and (best is None or len(module) > best.count):
            best = BlockStack(path=name, count=len(module))
    return best


def _signature(block: torch.nn.Module) -> Any:
    """What makes two blocks behave alike: classes, tensor shapes, hooks and plain attributes."""
    parts = []
    for name, module in block.named_modules():
        plain = tuple(sorted(
            (key, repr(value)) for key, value in vars(module).items()
            if not key.startswith("_") and not _INDEX_ATTRIBUTE.search(key)
            and isinstance(value, (int, float, str, bool, type(None), tuple))
        ))
        hooks = tuple(len(getattr(module, attribute)) for attribute in (
            "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
        tensors = tuple(
            (key, tuple(value.shape), value.dtype, value.requires_grad)
            for key, value in [*module._parameters.items(), *module._buffers.items()] if value is not None
        )
        parts.append((name, type(module).__qualname__, plain, hooks, tensors))
    return tuple(parts)


class BlockTagger:
    """Tags each event of a fake run with the block it belongs to (None: outside the stack).

    Forward: the block whose module is running. Backward: the block whose forward made the
    autograd node now running (nodes are tagged when the block returns). Otherwise the block of
    the op's inputs (per position for `_foreach_` ops), or for a free the block that allocated it.
    """

    def __init__(self, stack: BlockStack) -> None:
        self.stack = stack
        self.module_stack: list[str] = []
        self.phase: Callable[[], str] = lambda: "idle"
        self.output_block: int | None = None
        self.key_block: dict[Any, int | None] = {}
        self.alloc_index: dict[Any, int] = {}
        self.tags: list[int | None] = []
        self.failure: str | None = None
        self._block_params: dict[int, set[int]] = {}
        self._boundaries: dict[int, set[int]] = {}
        self._handles: list[Any] = []

    @contextlib.contextmanager
    def truncated(self, model: torch.nn.Module) -> Iterator[None]:
        """While open, the stack in `model` holds only its first `TEMPLATE_BLOCKS` blocks."""
        blocks = model.get_submodule(self.stack.path)
        kept = blocks._modules
        blocks._modules = type(kept)(list(kept.items())[:TEMPLATE_BLOCKS])
        try:
            yield
        finally:
            blocks._modules = kept

    def attach(self, model: torch.nn.Module) -> None:
        """Hooks the (truncated, fake) model's blocks to tag the autograd nodes each one makes."""
        for index, block in enumerate(model.get_submodule(self.stack.path)):
            self._block_params[index] = {id(param) for param in block.parameters()}
            self._handles.append(block.register_forward_pre_hook(
                lambda module, args, kwargs, _i=index: self._enter(_i, args, kwargs), with_kwargs=True))
            self._handles.append(block.register_forward_hook(lambda module, args, output, _i=index: self._exit(_i, output)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, index: int, args: tuple, kwargs: dict) -> None:
        nodes = set()
        for value in torch.utils._pytree.tree_flatten((args, kwargs))[0]:
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                nodes.add(id(value.grad_fn))
        self._boundaries[index] = nodes

    def _exit(self, index: int, output: Any) -> None:
        boundary = self._boundaries.pop(index, set())
        stack = [value.grad_fn for value in torch.utils._pytree.tree_flatten(output)[0]
                 if isinstance(value, torch.Tensor) and value.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or id(node) in boundary or _TAG in node.metadata:
                continue
            variable = getattr(node, "variable", None)
            if variable is not None and id(variable) not in self._block_params[index]:
                continue  # a parameter outside this block (e.g. a shared one)
            node.metadata[_TAG] = index
            stack.extend(next_node for next_node, _ in node.next_functions)

    def position_block(self) -> int | None:
        for name in reversed(self.module_stack):
            block = self.stack.block_of(name)
            if block is not None:
                return block
        node = torch._C._current_autograd_node()
        if node is not None:
            return node.metadata.get(_TAG)
        return None

    def block_of_output(self, func: Any, args: tuple, key_of: Callable[[torch.Tensor], Any | None], position: int | None) -> int | None:
        """The block an op's output belongs to when no block is running: its inputs' block."""
        if self.phase() not in _BETWEEN_PASSES or self.position_block() is not None:
            return None  # the running block (or none) decides
        if position is not None and func.__name__.startswith("_foreach_"):
            for arg in args:
                if isinstance(arg, (list, tuple)) and len(arg) > position and isinstance(arg[position], torch.Tensor):
                    return self.key_block.get(key_of(arg[position]))
        blocks = set()
        for value in torch.utils._pytree.tree_flatten(args)[0]:
            if isinstance(value, torch.Tensor):
                block = self.key_block.get(key_of(value))
                if block is not None:
                    blocks.add(block)
        if len(blocks) > 1 and position is None:
            self.failure = f"op {func} reads tensors of several blocks and needs scratch memory"
        return blocks.pop() if len(blocks) == 1 else None

    def tag(self, event: tuple[Any, ...], index: int) -> None:
        """Records the block of `event`, the `index`-th of the log."""
        kind = event[0]
        block = None
        if kind == "alloc":
            if event[4] is not None:  # preexisting: its owner module says
                block = self.stack.block_of(event[4])
            else:
                block = self.position_block()
                if block is None and self.phase() in _BETWEEN_PASSES:
                    block = self.output_block
            self.key_block[event[1]] = block
            self.alloc_index[event[1]] = index
        elif kind == "free":
            block = self.position_block()
            if block is None and self.phase() in _BETWEEN_PASSES:
                block = self.key_block.get(event[1])
        elif kind in ("enter", "exit"):
            block = self.stack.block_of(event[1])
        elif kind == "claim":
            # a tensor created for a parameter outside any block context (an optimizer's `step`)
            # belongs to the parameter's block
            for key, module in event[2]:
                owner = self.stack.block_of(module)
                if owner is not None and self.key_block.get(key) is None and key in self.alloc_index:
                    self.key_block[key] = owner
                    self.tags[self.alloc_index[key]] = owner
        self.tags.append(block)


class TaggedLog(MemoryLog):
    """A MemoryLog that asks `tagger` for the block of every event it records."""

    def __init__(self, tagger: BlockTagger, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tagger = tagger

    def _add(self, event: tuple[Any, ...], time_ns: int | None) -> None:
        self.tagger.tag(event, len(self.events))
        super()._add(event, time_ns)

    def remove_event(self, index: int) -> None:
        super().remove_event(index)
        del self.tagger.tags[index]
        for key, where in self.tagger.alloc_index.items():
            if where > index:
                self.tagger.alloc_index[key] = where - 1


class _NotRepeatable(Exception):
    pass


def expand_log(log: MemoryLog, tags: list[int | None], stack: BlockStack, module_names: list[str]) -> MemoryLog:
    """The log a trace of all `stack.count` blocks writes, from the tagged trace of three.

    Raises:
        _NotRepeatable: the trace is not made of per-block runs that can be repeated.
    """
    count = stack.count
    events = log.events
    # 1. Runs: maximal stretches of tagged events, split into per-block sub-runs.
    items: list[tuple[str, Any]] = []
    index = 0
    while index < len(events):
        if tags[index] is None:
            items.append(("skeleton", index))
            index += 1
            continue
        runs: list[tuple[int, list[int]]] = []
        while index < len(events) and tags[index] is not None:
            late_free = (events[index][0] == "free" and len(runs) >= 2 and runs[-2][0] == tags[index])
            if runs and (runs[-1][0] == tags[index] or late_free):
                # a free that lags into the next block's events (a loop variable rebound there)
                # stays where it happens
                runs[-1][1].append(index)
            else:
                runs.append((tags[index], [index]))
            index += 1
        items.append(("group", runs))
    _alloc_bytes = {event[1]: event[2] for event in events if event[0] == "alloc"}
    # 2. Slots: the n-th allocation of a block's sub-run in a group, to match keys across blocks.
    key_slot: dict[Any, tuple[int, tuple[int, int]]] = {}
    slot_key: dict[int, dict[tuple[int, int], Any]] = {0: {}, 1: {}, 2: {}}
    run_allocs: dict[tuple[int, int], int] = {}  # (group, block) -> allocations in that sub-run
    first_in_group: dict[int, int] = {}
    for group_number, (kind, value) in enumerate(items):
        if kind != "group":
            continue
        order = [block for block, _ in value]
        if len(set(order)) != len(order) or (order != sorted(order) and order != sorted(order, reverse=True)):
            raise _NotRepeatable(f"blocks interleave in one stretch of events ({order})")
        if 0 in order and 2 in order and _MIDDLE not in order:
            raise _NotRepeatable("a stretch of events skips the middle block")
        first_in_group[group_number] = order[0]
        for block, indices in value:
            ordinal = 0
            run_allocs[(group_number, block)] = sum(events[i][0] == "alloc" for i in indices)
            for event_index in indices:
                if events[event_index][0] == "alloc":
                    slot = (group_number, ordinal)
                    key_slot[events[event_index][1]] = (block, slot)
                    slot_key[block][slot] = events[event_index][1]
                    ordinal += 1

    def true_class(block: int) -> int:
        return 0 if block == 0 else (2 if block == count - 1 else _MIDDLE)

    def key_in(key: Any, true_block: int) -> Any:
        """The key, in true block `true_block`, at the slot where template `key` sits."""
        if not 0 <= true_block < count:
            raise _NotRepeatable(f"a reference to block {true_block} outside the stack")
        block, slot = key_slot[key]
        cls = true_class(true_block)
        if cls == block:
            found = key
        else:
            group, ordinal = slot
            mine, theirs = run_allocs[(group, block)], run_allocs.get((group, cls), -1)
            if mine != theirs and first_in_group[group] == block:
                # the stretch began inside this block's events: count from the end instead
                ordinal = theirs - (mine - ordinal)
            found = slot_key[cls].get((group, ordinal))
            if found is None or _alloc_bytes[found] != _alloc_bytes[key]:
                raise _NotRepeatable("blocks allocate differently")
        return (found, true_block) if cls == _MIDDLE else found

    def reference(key: Any, template_block: int | None, true_block: int | None) -> Any:
        if key not in key_slot:
            return key  # allocated outside the stack
        allocated_in = key_slot[key][0]
        if true_block is None:  # referenced from outside the stack
            return key if allocated_in != _MIDDLE else None
        return key_in(key, true_block + allocated_in - template_block)

    out = MemoryLog(mode=log.mode, module_names=module_names)
    out.notes = list(getattr(log, "notes", []))
    add = out._add

    def emit(event: tuple[Any, ...], template_block: int | None, true_block: int | None) -> None:
        kind = event[0]
        if kind == "alloc":
            key = event[1] if template_block != _MIDDLE else (event[1], true_block)
            module = stack.rename(event[4], true_block) if true_block is not None else event[4]
            add(("alloc", key, event[2], event[3], module), None)
        elif kind == "free":
            key = reference(event[1], template_block, true_block)
            if key is None:  # a middle block's allocation freed outside the stack: free every copy
                for copy_block in range(1, count - 1):
                    add(("free", (event[1], copy_block)), None)
            else:
                add(("free", key), None)
        elif kind in ("enter", "exit"):
            add((kind, stack.rename(event[1], true_block) if true_block is not None else event[1]), None)
        elif kind == "claim":
            entries = []
            for key, module in event[2]:
                if key in key_slot and key_slot[key][0] == _MIDDLE:
                    entries.extend(((key, block), stack.rename(module, block)) for block in range(1, count - 1))
                elif key in key_slot and key_slot[key][0] == 2:
                    entries.append((key, stack.rename(module, count - 1)))
                else:
                    entries.append((key, module))
            add(("claim", event[1], entries), None)
        else:
            add(event, None)

    for kind, value in items:
        if kind == "skeleton":
            emit(events[value], None, None)
            continue
        descending = len(value) > 1 and value[0][0] > value[-1][0]
        for block, indices in value:
            if block == _MIDDLE:
                copies = range(1, count - 1)
                true_blocks = reversed(copies) if descending else copies
            else:
                true_blocks = (0,) if block == 0 else (count - 1,)
            for true_block in true_blocks:
                for event_index in indices:
                    emit(events[event_index], block, true_block)
    return out


def stacked_step_log(run: Callable[[BlockTagger], MemoryLog], stack: BlockStack, module_names: list[str]) -> tuple[MemoryLog | None, str]:
    """Runs `run(tagger)` (a fake run of the model truncated to three blocks) and expands its log.

    Returns:
        (the full stack's log, a sentence saying how it was made) or (None, why it could not be).
    """
    tagger = BlockTagger(stack)
    log = run(tagger)
    if tagger.failure:
        return None, tagger.failure
    try:
        full = expand_log(log, tagger.tags, stack, module_names)
    except _NotRepeatable as error:
        return None, str(error)
    return full, (f"{stack.count} identical blocks in {stack.path}: traced {TEMPLATE_BLOCKS}, the middle block's "
                  f"events repeated for the other {stack.count - TEMPLATE_BLOCKS} (the events a full trace writes)")
