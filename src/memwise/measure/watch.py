"""`watch`: measure the user's own training loop, step by step, and find its memory hazards.

    with memwise.watch(model, optimizer) as w:
        for x, y in loader:
            ...                      # the loop, unchanged
    print(w.result().hazards)

Totals and categories come from the same machinery as `profile`: the PyTorch profiler's allocator
events with memwise's markers stamped into the same stream (`measure/tracker.py`), classified by
`MemoryLog`. A step ends at each `optimizer.step()` (a global optimizer hook) or at `w.step()`.

Source lines come from a `TorchDispatchMode` that notes, for every new output storage, the
innermost Python frame outside torch and memwise. Only a (file, line) pair is kept per storage,
in one dictionary per step; after the run, the line is looked up only for the allocations that
matter (those that outlive their step), so no stack is formatted for the rest.
"""

import bisect
import contextlib
import dataclasses
import gc
import inspect
import os
import statistics
import sys
import sysconfig
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from memwise.core.errors import BadInputError
from memwise.core.units import format_bytes
from memwise.doctor.hazards import (
    Hazard,
    Location,
    fragmentation_hazard,
    make_hazard,
    worker_rss_hazard,
)
from memwise.measure.memory_log import CATEGORIES, Breakdown, MemoryLog
from memwise.measure.tracker import (
    _MARK_PREFIX,
    ModuleMarks,
    _Marker,
    allocation_events,
    module_names,
    parameter_owners,
    persistent_tensors,
    profiling_memory,
    storage_key,
)

Site = tuple[str, int]

# Growth: an allocation made in step k that is still alive at the end of the watch, seen in at
# least this many steps (step 0 and the last step excluded: warm-up, and loop variables that the
# next step would replace), of at least this many bytes per step.
GROWTH_MIN_STEPS = 2
GROWTH_MIN_BYTES = 1024
COPY_MIN_BYTES = 4096
TIED_MIN_ELEMENTS = 1024
# DataLoader workers: a dataset attribute that is a Python list/dict/tuple this long is a cause of
# copy-on-read (each item's reference count is written when a worker reads it).
PYTHON_OBJECTS_MIN_ITEMS = 10_000
_PERSISTENT = ("param", "buffer", "grad", "optimizer_state")
_WATCH_MARKS = ("step_end", "forward_begin", "forward_end")


def _internal_prefixes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(prefixes of internal files, prefixes that are never internal: site-packages)."""
    here = os.path.dirname(os.path.abspath(__file__))
    memwise_dir = os.path.dirname(here)
    internal = [os.path.dirname(torch.__file__) + os.sep, here + os.sep]
    internal += [os.path.join(memwise_dir, name) + os.sep for name in ("doctor", "integrations")]
    paths = sysconfig.get_paths()
    site_packages = tuple({paths["purelib"] + os.sep, paths["platlib"] + os.sep})
    return tuple(internal), (paths["stdlib"] + os.sep, site_packages)


_INTERNAL, (_STDLIB, _SITE_PACKAGES) = _internal_prefixes()
_is_internal_cache: dict[Any, bool] = {}


def user_site(skip: int = 1) -> Site | None:
    """(file, line) of the innermost frame outside torch, memwise's measurement code and the
    standard library: the line of the user's code that led here."""
    frame = sys._getframe(skip)
    while frame is not None:
        code = frame.f_code
        internal = _is_internal_cache.get(code)
        if internal is None:
            name = code.co_filename
            internal = name.startswith(("<", *_INTERNAL)) or (name.startswith(_STDLIB) and not name.startswith(_SITE_PACKAGES))
            _is_internal_cache[code] = internal
        if not internal:
            return code.co_filename, frame.f_lineno
        frame = frame.f_back
    return None


def _location(site: Site | None) -> Location:
    return Location(file=site[0], line=site[1]) if site else Location(file=None, line=None)


class SiteRecorder(TorchDispatchMode):
    """Notes the user's source line of every new output storage, and conversions of the same data.

    `sites` maps a storage's data pointer to its (file, line) for the current step; `next_step()`
    files it away and starts a new one (a pointer reused inside a step keeps its last line, which
    is the live allocation's when the pointer is still allocated).
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: dict[int, Site | None] = {}
        self.sites_by_step: list[dict[int, Site | None]] = []
        self.prior_sites: dict[int, Site | None] = {}
        self.step = -1
        self.conversions: list[tuple[int, tuple[Any, ...], int, Site | None]] = []
        self._aliasing: dict[Any, bool] = {}
        self._sources: dict[int, tuple[weakref.ref, int]] = {}  # id(tensor) -> (the tensor, its number)
        self._sources_seen: list[int] = []

    def start_steps(self) -> None:
        """The sites noted so far are from before the first step."""
        self.prior_sites, self.sites, self.step = self.sites, {}, 0

    def next_step(self) -> None:
        self.sites_by_step.append(self.sites)
        self.sites = {}
        self.step += 1

    def source_id(self, number: int) -> int:
        """id() of the tensor a conversion's key numbers (see `conversions`)."""
        return self._sources_seen[number]

    def site_of(self, key: int, step: int) -> Site | None:
        """The line that made the storage at `key`, allocated in `step` (-1: before the first step)."""
        table = self.prior_sites if step < 0 else (self.sites_by_step[step] if step < len(self.sites_by_step) else self.sites)
        return table.get(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        aliasing = self._aliasing.get(func)
        if aliasing is None:
            aliasing = any(ret.alias_info is not None for ret in func._schema.returns)
            self._aliasing[func] = aliasing
        if func is torch.ops.aten.copy_.default:
            self._note_conversion(args[1], args[0])
        if aliasing:
            return out
        site = user_site(2)
        if isinstance(out, torch.Tensor):
            self._note(out, site)
        elif isinstance(out, (tuple, list)):
            for item in out:
                if isinstance(item, torch.Tensor):
                    self._note(item, site)
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            self._note_conversion(args[0], out, site)
        return out

    def _note(self, tensor: torch.Tensor, site: Site | None) -> None:
        try:
            key = tensor.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return
        if key:
            self.sites[key] = site

    def _note_conversion(self, source: Any, out: torch.Tensor, site: Site | None = None) -> None:
        if not isinstance(source, torch.Tensor) or type(source) is not torch.Tensor or self.step < 0:
            return
        if site is None:  # copy_: only copies between devices are host-to-device traffic
            if source.device == out.device:
                return
            site = user_site(3)
        # The same data is the same tensor object (a view's base): an address can be reused by new data.
        base = source._base if source._base is not None else source
        known = self._sources.get(id(base))
        if known is None or known[0]() is not base:
            known = self._sources[id(base)] = (weakref.ref(base), len(self._sources_seen))
            self._sources_seen.append(id(base))
        key = (known[1], source._version, source.storage_offset(), tuple(source.shape), source.dtype, out.dtype, out.device)
        self.conversions.append((self.step, key, out.untyped_storage().nbytes(), site))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepMemory:
    """Memory of one watched step (all sizes in bytes, measured from allocator events).

    Attributes:
        step: 0-based index of the step.
        live_bytes: bytes live when the step ended (after `optimizer.step()` or `w.step()`).
        live_by_category: `live_bytes` by category.
        peak_bytes: the most bytes live at once during the step.
        peak_by_category: `peak_bytes` by category.
        growth_bytes: `live_bytes` minus the previous step's (the first step: minus the baseline).
        step_ms: wall time from the previous step's end (or the start of the watch).
    """

    step: int
    live_bytes: int
    live_by_category: dict[str, int]
    peak_bytes: int
    peak_by_category: dict[str, int]
    growth_bytes: int
    step_ms: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class AllocationNote:
    """The allocator event at one timeline sample: what made it and where (for the HTML report's hover).

    Attributes:
        bytes: its size, positive for an allocation, negative for a free.
        op: the aten operator that allocated or freed (None outside any operator).
        module: the innermost module running then, or None.
        file, line: the user's source line that made the allocation (None for frees and unknown lines).
    """

    bytes: int
    op: str | None
    module: str | None
    file: str | None
    line: int | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class WatchResult(Breakdown):
    """What `watch` measured: a `Breakdown` over the watched steps (as `Profile`), per-step memory
    and the hazards found.

    Attributes:
        workload: the watched model's class name.
        mode: `train` when a backward ran, else `infer`.
        device: where the model's parameters live.
        steps: steps watched.
        step_ms: median step time (steps after the first when there are several).
        step_memory: one `StepMemory` per step.
        hazards: the hazards found, largest first.
        timeline_allocations: one `AllocationNote` per `timeline` sample.
    """

    workload: str
    mode: str
    device: str
    torch_version: str
    steps: int
    step_ms: float
    step_memory: tuple[StepMemory, ...]
    hazards: tuple[Hazard, ...]
    timeline_allocations: tuple[AllocationNote, ...] = ()
    source: str = "measured"


@dataclasses.dataclass
class _Forward:
    """One call of the watched model's forward."""

    index: int
    step: int
    site: Site | None
    grad_enabled: bool
    training: bool
    output_keys: tuple[int, ...] = ()
    backpropagated: bool = False


@dataclasses.dataclass
class _Backward:
    step: int
    site: Site | None
    retain_graph: bool
    graph_keys: set[int] = dataclasses.field(default_factory=set)


class Watch:
    """Watches `model` (and `optimizer`) while the body of a `with` block runs; see `watch`."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, steps: int | None = None, *,
        site_recorder: SiteRecorder | None = None, record_stacks: bool = True,
        on_finish: Callable[["Watch"], None] | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise BadInputError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise BadInputError(f"watch: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise BadInputError(f"watch: steps must be a positive integer or None, got {steps!r}")
        self.model = model
        self.optimizer = _unwrap_optimizer(optimizer) if optimizer is not None else None
        self.max_steps = steps
        self.device = _model_device(model)
        self.recorder = site_recorder if site_recorder is not None else (SiteRecorder() if record_stacks else None)
        self._own_recorder = site_recorder is None and self.recorder is not None
        self.on_finish = on_finish
        self.steps_done = 0
        self.manual_steps = False
        self.entry_site: Site | None = None
        self._result: WatchResult | None = None
        self._active = False
        self._finished = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "Watch":
        self.start(user_site(2))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish()
        else:  # the loop failed (an OOM at step 3,000): analyse what was seen, never mask its error
            with contextlib.suppress(Exception):
                self.finish()
        return False

    def start(self, entry_site: Site | None = None) -> None:
        """Starts watching (called by `with`; the script runner calls it when the optimizer is made)."""
        global _ACTIVE
        if _ACTIVE is not None:
            raise BadInputError("watch: another memwise.watch is already active; watch one loop at a time")
        _ACTIVE = self
        try:
            self._start(entry_site)
        except BaseException:
            _ACTIVE = None
            self._stack.close()
            raise

    def _start(self, entry_site: Site | None) -> None:
        self._stack = contextlib.ExitStack()
        self.entry_site = entry_site
        self.marker = _Marker()
        self._owners = parameter_owners(self.model)
        self._params = list(self.model.parameters())
        self._persistent = self._persistent_state()
        self._forwards: list[_Forward] = []
        self._backwards: list[_Backward] = []
        self._zeroed_grads: list[tuple[int, int, Site | None]] = []
        self._unheld_grads: list[tuple[int, int, Site | None, list[str]]] = []
        self._zero_grad_calls: list[tuple[bool, Site | None]] = []
        self._worker_rss: list[tuple[int, int]] = []
        self._cuda_hazards: list[Hazard] = []
        self._step_ms: list[float] = []
        self._phase = "idle"
        self._forward_seen_in_step = False
        self._backward_seen = False
        self._prof = self._stack.enter_context(profiling_memory(self.device))
        self.marker("phase", "idle", 0)
        if self.recorder is not None:
            if self._own_recorder:
                self._stack.enter_context(self.recorder)
            self.recorder.start_steps()
        self._hooks = ModuleMarks(self.model, lambda name: self.marker("enter", name), lambda name: self.marker("exit", name))
        self._handles = [
            self.model.register_forward_pre_hook(self._on_forward_begin, with_kwargs=True),
            self.model.register_forward_hook(self._on_forward_end, always_call=True),
            register_optimizer_step_pre_hook(self._on_optimizer_begin),
            register_optimizer_step_post_hook(self._on_optimizer_end),
        ]
        self._original_backward = torch.autograd.backward
        torch.autograd.backward = self._backward
        self._patched_zero_grad = []
        for owner in (self.model, self.optimizer):
            if owner is not None:
                self._patch_zero_grad(owner)
        with _gc_paused():
            self._weight_findings = self._weight_hazards()
        self._step_started = time.perf_counter()
        self._active = True

    def finish(self) -> None:
        """Stops watching and analyses what was recorded (once; later calls do nothing)."""
        global _ACTIVE
        if self._finished or not getattr(self, "_active", False):
            return
        self._finished = True
        self._active = False
        try:
            torch.autograd.backward = self._original_backward
            for owner in self._patched_zero_grad:
                with contextlib.suppress(AttributeError):
                    del owner.zero_grad
            self._hooks.remove()
            for handle in self._handles:
                handle.remove()
            self._stack.close()
            if self.steps_done:
                self._result = self._analyse(self._prof)
        finally:
            _ACTIVE = None
        if self.on_finish is not None:
            self.on_finish(self)

    def step(self) -> None:
        """Marks the end of a step; once called, only `w.step()` ends steps (not `optimizer.step()`)."""
        if not self._active:
            raise BadInputError("watch: w.step() called outside the `with memwise.watch(...)` block")
        self.manual_steps = True
        self._end_step()

    def begin_forward(self) -> None:
        """Marks the start of a step's forward, for frameworks whose step may not call the watched
        module itself (Lightning's `training_step` can call its submodules directly)."""
        if self._active and self._phase != "forward":
            self._set_phase("forward")

    def result(self) -> WatchResult:
        """The measured steps and the hazards found.

        Raises:
            BadInputError: no step was seen (say how to mark one), or the watch has not finished.
        """
        if not self._finished:
            raise BadInputError("watch: result() is available after the `with` block ends (or after `steps` steps)")
        if self._result is None:
            raise BadInputError(
                "watch: no step was seen: memwise ends a step at each optimizer.step() of an optimizer over the "
                "model's parameters; without one, call w.step() at the end of each step of the loop"
            )
        return self._result

    @property
    def hazards(self) -> tuple[Hazard, ...]:
        return self.result().hazards

    # -- hooks -------------------------------------------------------------------------------------

    def _persistent_state(self) -> list[tuple[int, int, str, str]]:
        optimizer_owned = []
        if self.optimizer is not None:
            optimizer_owned = [value for state in self.optimizer.state.values() for value in state.values()
                               if isinstance(value, torch.Tensor)]
        found = persistent_tensors(self.model, optimizer_owned)
        found += [(param.grad, "grad", self._owners.get(id(param))) for param in self._params if param.grad is not None]
        entries, seen = [], set()
        for tensor, category, owner in found:
            key = storage_key(tensor)
            if key and key not in seen and tensor.device.type == self.device.type:
                seen.add(key)
                entries.append((key, tensor.untyped_storage().nbytes(), category, owner))
        return entries

    def _patch_zero_grad(self, owner: Any) -> None:
        original = owner.zero_grad
        calls = self._zero_grad_calls

        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            set_to_none = kwargs.get("set_to_none", args[0] if args else True)
            calls.append((bool(set_to_none), user_site(2)))
            return original(*args, **kwargs)

        owner.zero_grad = zero_grad
        self._patched_zero_grad.append(owner)

    def _set_phase(self, phase: str) -> None:
        self._phase = phase
        self.marker("phase", phase, self.steps_done)

    def _on_forward_begin(self, module: Any, args: Any, kwargs: Any) -> None:
        step = self.steps_done
        if not self._forward_seen_in_step:
            self._forward_seen_in_step = True
            self._check_zeroed_grads(step)
        if self._phase != "forward":
            self._set_phase("forward")
        inputs = [_key_or_none(t) for t in _tensors_in((args, kwargs)) if t.device.type == self.device.type]
        self.marker("claim", "input", [(key, None) for key in inputs if key])
        forward = _Forward(index=len(self._forwards), step=step, site=user_site(2),
                           grad_enabled=torch.is_grad_enabled(), training=self.model.training)
        self._forwards.append(forward)
        self.marker("forward_begin", forward.index)

    def _on_forward_end(self, module: Any, args: Any, output: Any) -> None:
        if not self._forwards:
            return
        forward = self._forwards[-1]
        outputs = list(_tensors_in(output))
        forward.output_keys = tuple(_key_or_none(t) for t in outputs if t.device.type == self.device.type)
        self.marker("forward_end", forward.index)
        for tensor in outputs:
            if tensor.requires_grad and tensor.grad_fn is not None:
                tensor.register_hook(lambda grad, _f=forward: _mark_backpropagated(_f, grad))

    def _backward(self, tensors: Any, grad_tensors: Any = None, retain_graph: bool | None = None,
                  create_graph: bool = False, grad_variables: Any = None, inputs: Any = None) -> None:
        retain = bool(create_graph if retain_graph is None else retain_graph)
        backward = _Backward(step=self.steps_done, site=user_site(2), retain_graph=retain)
        self._backwards.append(backward)
        self._backward_seen = True
        self._set_phase("backward")
        result = self._original_backward(tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs=inputs)
        if retain:
            roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
            backward.graph_keys = _saved_storage_keys(
                [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None])
        return result

    def _is_watched(self, optimizer: torch.optim.Optimizer) -> bool:
        if self.optimizer is not None:
            return optimizer is self.optimizer
        ids = {id(p) for p in self._params}
        if any(id(p) in ids for group in optimizer.param_groups for p in group["params"]):
            self.optimizer = optimizer
            self._patch_zero_grad(optimizer)
            return True
        return False

    def _on_optimizer_begin(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not (self._active and self._is_watched(optimizer)):
            return
        if (args and args[0] is not None) or kwargs.get("closure") is not None:
            return  # step(closure): forward and backward run inside (Lightning); they mark their phases
        self._claim_grads()
        self._set_phase("optimizer")

    def _on_optimizer_end(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not (self._active and self._is_watched(optimizer)):
            return
        self._check_unheld_grads()
        if not self.manual_steps:
            self._end_step()

    def _claim_grads(self) -> None:
        grads = [(storage_key(p.grad), self._owners.get(id(p))) for p in self._params if p.grad is not None]
        self.marker("claim", "grad", grads)

    def _end_step(self) -> None:
        step = self.steps_done
        self._claim_grads()
        if self.optimizer is not None:
            state = [(storage_key(value), self._owners.get(id(param)))
                     for param, param_state in self.optimizer.state.items()
                     for value in param_state.values() if isinstance(value, torch.Tensor)]
            self.marker("claim", "optimizer_state", state)
        self._sample_workers(step)
        if self.device.type == "cuda":
            found = fragmentation_hazard(torch.cuda.memory_stats(self.device), step, _location(self.entry_site))
            if found is not None:
                self._cuda_hazards.append(found)
        self.marker("step_end", step)
        now = time.perf_counter()
        self._step_ms.append((now - self._step_started) * 1e3)
        self._step_started = now
        self.steps_done += 1
        self._forward_seen_in_step = False
        self._phase = "idle"
        self.marker("phase", "idle", self.steps_done)
        if self.recorder is not None:
            self.recorder.next_step()
        if self.max_steps is not None and self.steps_done >= self.max_steps:
            self.finish()

    def _check_zeroed_grads(self, step: int) -> None:
        """Gradients alive, and all zero, when a step's first forward starts: `zero_grad(set_to_none=False)`."""
        grads = {storage_key(p.grad): p.grad for p in self._params if p.grad is not None}
        if not grads or any(bool(grad.any()) for grad in grads.values()):
            return  # none, or accumulating on purpose
        calls = [site for set_to_none, site in self._zero_grad_calls if not set_to_none]
        nbytes = sum(grad.untyped_storage().nbytes() for grad in grads.values())
        self._zeroed_grads.append((step, nbytes, calls[-1] if calls else None))

    def _check_unheld_grads(self) -> None:
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        names = {id(p): name for name, p in self.model.named_parameters()}
        unheld = [p for p in self._params if p.grad is not None and id(p) not in held]
        if unheld:
            nbytes = sum({storage_key(p.grad): p.grad.untyped_storage().nbytes() for p in unheld}.values())
            site = self._backwards[-1].site if self._backwards else None
            self._unheld_grads.append((self.steps_done, nbytes, site, [names.get(id(p), "?") for p in unheld]))

    def _sample_workers(self, step: int) -> None:
        import psutil

        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        total = 0
        for child in children:
            with contextlib.suppress(psutil.Error):
                # Unique set size: pages only this worker holds. A forked worker's RSS counts the
                # parent's pages from the start; reading a Python object writes its reference count
                # and turns a shared page into a private copy, which USS sees and RSS does not.
                total += child.memory_full_info().uss
        if children:
            self._worker_rss.append((step, total))

    # -- analysis ----------------------------------------------------------------------------------

    def _analyse(self, prof: Any) -> WatchResult:
        with _gc_paused():
            return self._analyse_log(prof)

    def _analyse_log(self, prof: Any) -> WatchResult:
        log, marks = self._build_log(prof)
        breakdown = log.summarize()
        records = log._classify()
        walk = _walk(log, records, marks, self._forwards, self._backwards, self.steps_done)
        hazards = self._hazards(walk)
        hazards.sort(key=lambda hazard: -hazard.bytes)
        timed = self._step_ms[1:] if len(self._step_ms) > 1 else self._step_ms
        return WatchResult(
            **breakdown.breakdown_fields(),
            workload=type(self.model).__name__,
            mode=log.mode,
            device=str(self.device),
            torch_version=torch.__version__,
            steps=self.steps_done,
            step_ms=statistics.median(timed),
            step_memory=tuple(
                dataclasses.replace(memory, step_ms=self._step_ms[memory.step]) for memory in walk.step_memory
            ),
            hazards=tuple(hazards),
            timeline_allocations=self._notes(log, records, breakdown),
        )

    def _notes(self, log: MemoryLog, records: list[Any], breakdown: Breakdown) -> tuple[AllocationNote, ...]:
        """The allocator event at each timeline sample (found by its time), with operator, module and line."""
        timeline = breakdown.timeline
        timed = [(time_ns, index) for index, time_ns in enumerate(log.times_ns) if time_ns is not None]
        if timeline.x_unit != "ms" or not timed:
            return ()
        first = timed[0][0]
        wanted: dict[int, list[int]] = {}
        for sample, x in enumerate(timeline.x):
            position = bisect.bisect_right(timed, (first + round(x * 1e6), len(log.events))) - 1
            wanted.setdefault(timed[max(position, 0)][1], []).append(sample)
        notes: list[AllocationNote | None] = [None] * len(timeline.x)
        modules: list[str] = []
        sizes: dict[Any, int] = {}
        for index, event in enumerate(log.events):
            kind = event[0]
            freed = sizes.pop(event[1], 0) if kind == "free" else 0
            if kind == "alloc":
                sizes[event[1]] = event[2]
            elif kind == "enter":
                modules.append(event[1])
            elif kind == "exit" and event[1] in modules:
                del modules[len(modules) - 1 - modules[::-1].index(event[1]):]
            if index not in wanted:
                continue
            nbytes, site = 0, None
            if kind == "alloc":
                nbytes = event[2]
                site = self.recorder.site_of(event[1], records[index].step) if self.recorder is not None else None
            elif kind == "free":
                nbytes = -freed
            note = AllocationNote(bytes=nbytes, op=self._ops.get(index), module=modules[-1] if modules else None,
                                  file=site[0] if site else None, line=site[1] if site else None)
            for sample in wanted[index]:
                notes[sample] = note
        empty = AllocationNote(bytes=0, op=None, module=None, file=None, line=None)
        return tuple(note or empty for note in notes)

    def _build_log(self, prof: Any) -> tuple[MemoryLog, list[tuple[int, str, tuple[Any, ...]]]]:
        """The memory log of the watched steps, and watch's own marks as (log position, name, args)."""
        log = MemoryLog(mode="train" if self._backward_seen else "infer", module_names=module_names(self.model))
        for key, nbytes, category, owner in self._persistent:
            log.preexisting(key, nbytes, category, owner)
        marks = []
        self._ops: dict[int, str] = {}  # log event index -> the operator that allocated or freed
        for start_ns, _, event in allocation_events(prof, self.device):
            fields = event.extra_fields
            if isinstance(fields, torch._C._profiler._ExtraFields_Allocation):
                if event.parent is not None:
                    self._ops[len(log.events)] = event.parent.name
                if fields.alloc_size > 0:
                    log.alloc(fields.ptr, fields.alloc_size, start_ns)
                elif fields.alloc_size < 0:
                    log.free(fields.ptr, start_ns)
                continue
            method, args = self.marker.records[int(event.name[len(_MARK_PREFIX):])]
            if method in _WATCH_MARKS:
                marks.append((len(log.events), method, args))
            else:
                getattr(log, method)(*args, time_ns=start_ns)
        return log, marks

    def _hazards(self, walk: "_Walk") -> list[Hazard]:
        hazards = self._growth_hazards(walk)
        growth_keys = {key for key, _ in walk.survivors}
        for step, nbytes, site in self._zeroed_grads:
            hazards.append(make_hazard(
                "zero_grad_not_none", nbytes, [step], _location(site),
                f"{format_bytes(nbytes)} of gradients, zeroed but not freed, were alive when step {step}'s forward began",
            ))
        hazards = _merge_same(hazards)
        for step, nbytes, site, names in self._unheld_grads:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            hazards.append(make_hazard(
                "grads_not_in_optimizer", nbytes, [step], _location(site),
                f"{format_bytes(nbytes)} of gradients were computed for {len(names)} parameters the optimizer does not hold ({shown})",
            ))
        for backward, nbytes in walk.retained:
            hazards.append(make_hazard(
                "retain_graph_unused", nbytes, [backward.step], _location(backward.site),
                f"backward(retain_graph=True) in step {backward.step} kept {format_bytes(nbytes)} of saved activations "
                "alive after it, and no later backward used them",
            ))
        kept_graph_lines = {hazard.location for hazard in hazards if hazard.kind == "graph_kept"}
        for forward, keys_bytes in walk.unused_graphs:
            kept = {key: nbytes for key, nbytes in keys_bytes.items() if key not in growth_keys}
            nbytes = sum(kept.values())
            if nbytes < GROWTH_MIN_BYTES or nbytes < sum(keys_bytes.values()) / 2 or _location(forward.site) in kept_graph_lines:
                continue  # too small, or its graph is kept across steps (reported as graph_kept)
            hazards.append(make_hazard(
                "eval_without_no_grad", nbytes, [forward.step], _location(forward.site),
                f"a forward with gradients enabled saved {format_bytes(nbytes)} of activations for a backward that never came",
            ))
        hazards += self._conversion_hazards()
        hazards += self._weight_findings
        hazards += self._cuda_hazards[-1:]
        dataset = self._dataset_location() if self._worker_rss else None
        found = worker_rss_hazard(self._worker_rss, *dataset) if dataset is not None else None
        if found is not None:
            hazards.append(found)
        return _merge_same(hazards)

    def _growth_hazards(self, walk: "_Walk") -> list[Hazard]:
        if not walk.survivors:
            return []
        records = dict(walk.survivors)
        site_of = (lambda key: self.recorder.site_of(key, records[key].step)) if self.recorder is not None else (lambda key: None)
        tensors_by_key: dict[int, list[torch.Tensor]] = {}
        for tensor in _live_tensors():
            key = _key_or_none(tensor)
            if key in records:
                tensors_by_key.setdefault(key, []).append(tensor)
        holders: dict[int, tuple[Site | None, set[int]]] = {}  # step -> (line, storages its graph keeps)
        for key, tensors in tensors_by_key.items():
            step = records[key].step
            for tensor in tensors:
                if tensor.grad_fn is not None and step not in holders:
                    holders[step] = (site_of(key), {key} | _saved_storage_keys([tensor.grad_fn]))
        in_dicts = _keys_held_by_dicts(tensors_by_key, records)
        groups: dict[tuple[str, Site | None], dict[int, int]] = {}
        for key, record in walk.survivors:
            holder = holders.get(record.step)
            if holder is not None and (key in holder[1] or record.category in ("activation", "input")):
                group = ("graph_kept", holder[0])
            else:
                group = ("cache_never_evicts" if key in in_dicts else "tensors_accumulated", site_of(key))
            per_step = groups.setdefault(group, {})
            per_step[record.step] = per_step.get(record.step, 0) + record.nbytes
        hazards = []
        for (kind, site), per_step in groups.items():
            nbytes = int(statistics.median(per_step.values()))
            if len(per_step) < GROWTH_MIN_STEPS or nbytes < GROWTH_MIN_BYTES:
                continue
            steps = sorted(per_step)
            what = {"graph_kept": "tensors that hold their autograd graph", "cache_never_evicts": "tensors kept in a dict",
                    "tensors_accumulated": "tensors"}[kind]
            hazards.append(make_hazard(
                kind, nbytes, steps, _location(site),
                f"memory grows by {format_bytes(nbytes)} per step ({format_bytes(sum(per_step.values()))} over steps "
                f"{steps[0]}-{steps[-1]}, still alive at the end): {what}, made on this line, outlive their step",
            ))
        return hazards

    def _conversion_hazards(self) -> list[Hazard]:
        if self.recorder is None:
            return []
        own = {id(t) for t in (*self.model.parameters(), *self.model.buffers())}
        seen: dict[tuple[Any, ...], dict[int, tuple[int, Site | None]]] = {}
        for step, key, nbytes, site in self.recorder.conversions:
            if nbytes < COPY_MIN_BYTES or self.recorder.source_id(key[0]) in own:
                continue  # autocast's casts of the weights, tiny scalars
            seen.setdefault(key, {})[step] = (nbytes, site)
        hazards = []
        for key, per_step in seen.items():
            if len(per_step) < 2:
                continue
            nbytes, site = next(iter(per_step.values()))
            hazards.append(make_hazard(
                "repeated_host_to_device_copy", nbytes, list(per_step), _location(site),
                f"the same unchanged {key[3]} {str(key[4]).replace('torch.', '')} tensor was copied to "
                f"{key[6]} {str(key[5]).replace('torch.', '')} again in {len(per_step)} steps ({format_bytes(nbytes)} each)",
            ))
        return hazards

    def _weight_hazards(self) -> list[Hazard]:
        """Tied weights duplicated, and fp32 copies beside bf16/fp16 weights, found by value when the
        watch starts (before training steps make a stale copy differ from its weights)."""
        hazards = []
        site_of = (lambda key: self.recorder.site_of(key, -1)) if self.recorder is not None else (lambda key: None)
        params = [(name, p) for name, p in self.model.named_parameters()]
        by_shape: dict[tuple[Any, ...], list[tuple[str, torch.Tensor]]] = {}
        for name, param in params:
            if param.numel() >= TIED_MIN_ELEMENTS:
                by_shape.setdefault((tuple(param.shape), param.dtype, param.device), []).append((name, param))
        with torch.no_grad():
            for group in by_shape.values():
                # 64 evenly spaced values first: full comparisons only for likely pairs (a 7B model
                # has hundreds of same-shape weights).
                prints = [_fingerprint(param) for _, param in group]
                for index, (name, param) in enumerate(group):
                    for other_index, (other_name, other) in enumerate(group[:index]):
                        if (prints[other_index] != prints[index] or storage_key(other) == storage_key(param)
                                or not _varies(param) or not torch.equal(param, other)):
                            continue
                        nbytes = param.untyped_storage().nbytes()
                        hazards.append(make_hazard(
                            "tied_weights_duplicated", nbytes, [0], _location(site_of(storage_key(param)) or self.entry_site),
                            f"{name} and {other_name} hold equal values in two storages ({format_bytes(nbytes)} duplicated)",
                        ))
                        break
            low = {(tuple(p.shape), p.device): p for _, p in params if p.dtype in (torch.bfloat16, torch.float16)}
            if low:
                held = self._optimizer_keys()
                copies: dict[int, tuple[int, Site | None]] = {}
                for obj in _live_tensors():
                    if obj.dtype != torch.float32 or (tuple(obj.shape), obj.device) not in low:
                        continue
                    key = storage_key(obj)
                    param = low[(tuple(obj.shape), obj.device)]
                    if key in held or key in copies or not _varies(param) or not torch.equal(obj.to(param.dtype), param):
                        continue
                    copies[key] = (obj.untyped_storage().nbytes(), site_of(key))
                if copies:
                    nbytes = sum(size for size, _ in copies.values())
                    sites = [site for _, site in copies.values() if site is not None]
                    hazards.append(make_hazard(
                        "fp32_copy_beside_bf16", nbytes, [0], _location(sites[0] if sites else self.entry_site),
                        f"{len(copies)} fp32 tensors ({format_bytes(nbytes)}) hold the same values as the model's "
                        "low-precision weights and are not the optimizer's",
                    ))
        return hazards

    def _optimizer_keys(self) -> set[int]:
        if self.optimizer is None:
            return set()
        keys = {storage_key(value) for state in self.optimizer.state.values() for value in state.values()
                if isinstance(value, torch.Tensor)}
        keys |= {storage_key(p) for group in self.optimizer.param_groups for p in group["params"]}
        return keys

    def _dataset_location(self) -> tuple[Location, str] | None:
        """(where the dataset class is defined, its name) for the first multi-worker DataLoader whose
        dataset holds a large Python list or dict (what workers copy on read), else None."""
        for obj in gc.get_objects():
            if not (issubclass(type(obj), torch.utils.data.DataLoader) and obj.num_workers > 0):
                continue
            dataset = obj.dataset
            containers = [value for value in getattr(dataset, "__dict__", {}).values() if type(value) in (list, dict, tuple)]
            if not any(len(value) >= PYTHON_OBJECTS_MIN_ITEMS for value in containers):
                continue
            dataset_type = type(dataset)
            with contextlib.suppress(OSError, TypeError):
                return Location(file=inspect.getsourcefile(dataset_type), line=inspect.getsourcelines(dataset_type)[1]), dataset_type.__name__
            return _location(self.entry_site), dataset_type.__name__
        return None


# The one watch running: it patches process-wide functions (torch.autograd.backward, global
# optimizer hooks), so a second one at the same time is refused rather than stacked.
_ACTIVE: Watch | None = None


def watch(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, steps: int | None = None, *,
          record_stacks: bool = True) -> Watch:
    """Watches the memory of the loop run inside `with memwise.watch(model, optimizer) as w:`.

    A step ends at each `optimizer.step()` of `optimizer` (or, when it is None, of the first
    optimizer that steps any of `model`'s parameters), or at `w.step()` for loops without an
    optimizer (evaluation). After the block, `w.result()` is a `WatchResult`: the same breakdown
    as `profile` (allocator-exact totals by category and module, the timeline), memory per step,
    and the hazards found, each with its bytes, steps, source line and fix.

    Args:
        model: the module the loop runs (its parameters decide the device).
        optimizer: the loop's optimizer, or None to find it at its first step.
        steps: stop watching after this many steps (the loop goes on unwatched), or None for the
            whole block.
        record_stacks: note the source line of each allocation (needed for hazards' lines).

    Returns:
        A `Watch`, to use as a context manager.

    Raises:
        BadInputError: a bad argument, or a model on a device memwise cannot measure (not cpu/cuda).

    Known limitations:
        Memory allocated outside PyTorch's allocators is not seen; one optimizer is watched; a
        `torch.autograd.grad` call is not seen as a backward.
    """
    return Watch(model, optimizer, steps, record_stacks=record_stacks)


# -- helpers -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Walk:
    step_memory: list[StepMemory]
    survivors: list[tuple[int, Any]]
    retained: list[tuple[_Backward, int]]
    unused_graphs: list[tuple[_Forward, dict[int, int]]]


def _walk(log: MemoryLog, records: list[Any], marks: list[tuple[int, str, tuple[Any, ...]]],
          forwards: list[_Forward], backwards: list[_Backward], steps: int) -> _Walk:
    """Replays the classified log once: live bytes by category at each step's end and its peak,
    the allocations of steps 1..n-2 still alive at the end, the activations an unused retained
    graph kept, and what each never-backpropagated forward left alive."""
    live: dict[Any, tuple[Any, int]] = {}
    totals = dict.fromkeys(CATEGORIES, 0)
    step_peak, step_peak_totals = -1, dict(totals)
    forward_starts: dict[int, int] = {}
    unused = {f.index: f for f in forwards if f.grad_enabled and not f.backpropagated and f.output_keys}
    retained_by_step = {}
    for backward in backwards:  # the last backward of a step, when it retained a graph
        retained_by_step[backward.step] = backward if backward.retain_graph else None
    result = _Walk(step_memory=[], survivors=[], retained=[], unused_graphs=[])
    previous_live = None
    mark_index = 0

    def apply_mark(position: int, name: str, args: tuple[Any, ...]) -> None:
        nonlocal step_peak, step_peak_totals, previous_live
        if name == "forward_begin":
            forward_starts[args[0]] = position
        elif name == "forward_end" and args[0] in unused:
            forward = unused[args[0]]
            start = forward_starts.get(args[0], position)
            kept = {key: record.nbytes for key, (record, index) in live.items()
                    if index >= start and key not in forward.output_keys}
            result.unused_graphs.append((forward, kept))
        elif name == "step_end":
            step = args[0]
            live_bytes = sum(totals.values())
            baseline = previous_live if previous_live is not None else sum(
                record.nbytes for record, index in live.values() if record.step < 0)
            result.step_memory.append(StepMemory(
                step=step, live_bytes=live_bytes, live_by_category=dict(totals), peak_bytes=max(step_peak, live_bytes),
                peak_by_category=step_peak_totals if step_peak >= live_bytes else dict(totals),
                growth_bytes=live_bytes - baseline, step_ms=0.0,
            ))
            previous_live = live_bytes
            step_peak, step_peak_totals = -1, dict(totals)
            backward = retained_by_step.get(step)
            if backward is not None:
                nbytes = sum(record.nbytes for key, (record, _) in live.items()
                             if key in backward.graph_keys and record.category == "activation" and record.step == step)
                if nbytes >= GROWTH_MIN_BYTES:
                    result.retained.append((backward, nbytes))
            if step == steps - 1:
                result.survivors = [(key, record) for key, (record, _) in live.items()
                                    if 1 <= record.step <= steps - 2 and record.category not in _PERSISTENT]

    for index, event in enumerate(log.events):
        while mark_index < len(marks) and marks[mark_index][0] <= index:
            apply_mark(*marks[mark_index])
            mark_index += 1
        kind = event[0]
        if kind == "alloc":
            record = records[index]
            previous = live.pop(event[1], None)
            if previous is not None:
                totals[previous[0].category] -= previous[0].nbytes
            if record.category in totals:
                live[event[1]] = (record, index)
                totals[record.category] += record.nbytes
        elif kind == "free":
            previous = live.pop(event[1], None)
            if previous is not None:
                totals[previous[0].category] -= previous[0].nbytes
        else:
            continue
        total = sum(totals.values())
        if total > step_peak:
            step_peak, step_peak_totals = total, dict(totals)
    while mark_index < len(marks):
        apply_mark(*marks[mark_index])
        mark_index += 1
    return result


def _mark_backpropagated(forward: _Forward, grad: torch.Tensor) -> None:
    forward.backpropagated = True


def _tensors_in(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in a nested structure (tensor, sequence, mapping, model output object), 3 levels deep."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3:
        if isinstance(value, dict):
            value = value.values()
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = [getattr(value, field.name) for field in dataclasses.fields(value)]
        elif not isinstance(value, (tuple, list)):
            return
        for item in value:
            yield from _tensors_in(item, depth + 1)


def _saved_storage_keys(roots: list[Any]) -> set[int]:
    """Storage keys of the tensors saved for backward anywhere in the graphs at `roots`."""
    keys: set[int] = set()
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # freed by an earlier backward
                continue
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, torch.Tensor):
                    keys.add(storage_key(item))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return keys


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No automatic garbage collection inside: the analysis allocates in bursts, and each full
    collection walks every object of a large process (minutes in a long test session)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _live_tensors() -> Iterator[torch.Tensor]:
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter:
            yield obj


def _key_or_none(tensor: torch.Tensor) -> int | None:
    try:
        return storage_key(tensor)
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None


def _keys_held_by_dicts(tensors_by_key: dict[int, list[torch.Tensor]], records: dict[int, Any]) -> set[int]:
    """Keys of surviving tensors held as values of a Python dict that holds survivors of two or
    more steps (a cache that keeps growing), found in one pass over the garbage collector's objects."""
    owner_key = {id(tensor): key for key, tensors in tensors_by_key.items() for tensor in tensors}
    held: set[int] = set()
    for obj in gc.get_objects():
        if type(obj) is not dict:
            continue
        keys = [owner_key[id(value)] for value in obj.values() if id(value) in owner_key and isinstance(value, torch.Tensor)]
        if len({records[key].step for key in keys}) >= 2:
            held.update(keys)
    return held


def _fingerprint(tensor: torch.Tensor) -> tuple[float, ...]:
    flat = tensor.detach().reshape(-1)
    return tuple(flat[:: max(1, flat.numel() // 64)][:64].float().tolist())


def _varies(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds more than one value (equal constant tensors, e.g. LayerNorm weights, are not copies)."""
    flat = tensor.detach().reshape(-1)
    return bool((flat != flat[0]).any())


def _merge_same(hazards: list[Hazard]) -> list[Hazard]:
    """One hazard per (kind, line): steps joined, the largest bytes kept."""
    merged: dict[tuple[str, Location], Hazard] = {}
    for hazard in hazards:
        key = (hazard.kind, hazard.location)
        if key in merged:
            first = merged[key]
            bigger = hazard if hazard.bytes > first.bytes else first
            merged[key] = dataclasses.replace(bigger, steps=tuple(sorted(set(first.steps) | set(hazard.steps))))
        else:
            merged[key] = hazard
    return list(merged.values())


def _unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as Accelerate's `AcceleratedOptimizer`."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _model_device(model: torch.nn.Module) -> torch.device:
    tensors = list(model.parameters()) or list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    if device.type not in ("cpu", "cuda"):
        raise BadInputError(
            f"watch: the model is on {device.type!r}, which memwise cannot measure (its allocator events are "
            "CPU and CUDA only); move it to cpu or cuda"
        )
    return device
