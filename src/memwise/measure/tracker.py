"""Recording a memory log of real steps from allocator events.

Totals come from the allocator: the PyTorch profiler's memory events (`profile_memory=True`)
report every allocation and free made through the CPU or CUDA caching allocator, including those
inside fused kernels that a census of tensors cannot see. Attribution comes from markers: module
entries and exits, phase changes and claims ("these storages are now gradients") are stamped into
the same profiler stream as zero-length `record_function` ranges, so the order of markers and
allocator events is exact and no clock has to be matched.
"""

import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from memwise.measure.memory_log import ROOT_MODULE, MemoryLog

_MARK_PREFIX = "memwise::"


def storage_key(tensor: torch.Tensor) -> int:
    """The allocator key of a tensor's storage: its data pointer (views share it)."""
    return tensor.untyped_storage().data_ptr()


def module_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of every submodule, in definition order (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def persistent_tensors(model: torch.nn.Module, optimizer_owned: list[torch.Tensor] = ()) -> list[tuple[torch.Tensor, str, str]]:
    """(tensor, category, owning module) for what is alive before a step: parameters, buffers and
    tensors an optimizer keeps outside its state (fp32 master weights, as optimizer_state)."""
    found = []
    for category, named in (("param", model.named_parameters(remove_duplicate=False)),
                            ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            if tensor is not None and tensor.device.type != "meta":
                found.append((tensor, category, name.rpartition(".")[0] or ROOT_MODULE))
    found.extend((tensor, "optimizer_state", ROOT_MODULE) for tensor in optimizer_owned)
    return found


def preexisting_state(log: MemoryLog, tensors: list[tuple[torch.Tensor, str, str]]) -> None:
    """Adds the storages of `tensors` (see `persistent_tensors`) to `log` as alive before the first step."""
    seen: set[int] = set()
    for tensor, category, owner in tensors:
        key = storage_key(tensor)
        if key in seen or key == 0:
            continue
        seen.add(key)
        log.preexisting(key, tensor.untyped_storage().nbytes(), category, owner)


def parameter_owners(model: torch.nn.Module) -> dict[int, str]:
    """id(parameter) -> qualified name of the module that owns it (first owner for tied weights)."""
    owners: dict[int, str] = {}
    for name, param in model.named_parameters():
        owners.setdefault(id(param), name.rpartition(".")[0] or ROOT_MODULE)
    return owners


class ModuleMarks:
    """Forward hooks on every submodule that report entering and leaving it."""

    def __init__(self, model: torch.nn.Module, on_enter: Callable[[str], None], on_exit: Callable[[str], None]) -> None:
        self.handles = []
        for name, module in model.named_modules():
            if not name:
                continue
            self.handles.append(module.register_forward_pre_hook(lambda *_, _n=name: on_enter(_n)))
            self.handles.append(module.register_forward_hook(lambda *_, _n=name: on_exit(_n), always_call=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class _Marker:
    """Python-side log events, each stamped into the profiler stream so their order is exact."""

    def __init__(self) -> None:
        self.records: list[tuple[str, tuple[Any, ...]]] = []

    def __call__(self, method: str, *args: Any) -> None:
        index = len(self.records)
        self.records.append((method, args))
        with torch._C._profiler._RecordFunctionFast(f"{_MARK_PREFIX}{index}"):
            pass


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silences file descriptor 2 (Kineto prints a line at every profiler start and stop)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def profiling_memory(device: torch.device) -> Iterator[torch_profile]:
    """A `torch.profiler.profile(profile_memory=True)` session, started and stopped quietly."""
    prof = torch_profile(activities=_activities(device), profile_memory=True)
    with quiet_stderr():
        prof.start()
    try:
        yield prof
    finally:
        with quiet_stderr():
            prof.stop()


def _flatten(roots: list[Any]) -> Iterator[Any]:
    stack = list(reversed(roots))
    while stack:
        event = stack.pop()
        yield event
        stack.extend(reversed(event.children))


def allocation_events(prof: torch_profile, device: torch.device, *, with_marks: bool = True) -> list[tuple[int, int, Any]]:
    """(start_ns, order, event) for allocator events on `device` (and memwise markers), in time order."""
    events = []
    roots = prof.profiler.kineto_results.experimental_event_tree()
    for order, event in enumerate(_flatten(roots)):
        fields = event.extra_fields
        if isinstance(fields, torch._C._profiler._ExtraFields_Allocation):
            if fields.device.type != device.type:
                continue
        elif not (with_marks and event.name.startswith(_MARK_PREFIX)):
            continue
        events.append((event.start_time_ns, order, event))
    events.sort(key=lambda item: (item[0], item[1]))
    return events


def _activities(device: torch.device) -> list[ProfilerActivity]:
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    return activities


def record_steps(
    run_step: Callable[[int, "_Marker | None"], None],
    model: torch.nn.Module,
    persistent: list[tuple[torch.Tensor, str, str]],
    *,
    mode: str,
    steps: int,
    device: torch.device,
    with_marks: bool = True,
) -> tuple[MemoryLog, list[float]]:
    """Runs `run_step(step_index, marker)` `steps` times under the profiler; returns the log and step times.

    `persistent` (see `persistent_tensors`) is entered in the log as alive before the first step.

    `run_step` reports phases and claims through `marker(method, *args)`, whose methods are those
    of `MemoryLog` (`phase`, `claim`, ...). With `with_marks=False` nothing of memwise runs inside
    the profiled region but the steps themselves (the plain reference pass), and the log holds
    allocator events only.
    """
    log = MemoryLog(mode=mode, module_names=module_names(model))
    preexisting_state(log, persistent)
    marker = _Marker() if with_marks else None
    hooks = ModuleMarks(model, lambda name: marker("enter", name), lambda name: marker("exit", name)) if marker else None
    gc.collect()
    step_ms: list[float] = []
    try:
        with profiling_memory(device) as prof:
            for step in range(steps):
                start = time.perf_counter()
                run_step(step, marker)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        if hooks is not None:
            hooks.remove()
    first_phase_logged = False
    for start_ns, _, event in allocation_events(prof, device):
        fields = event.extra_fields
        if isinstance(fields, torch._C._profiler._ExtraFields_Allocation):
            if not first_phase_logged:  # a reference pass has no markers: open the first step here
                log.phase("idle", 0, start_ns)
                first_phase_logged = True
            if fields.alloc_size > 0:
                log.alloc(fields.ptr, fields.alloc_size, start_ns)
            elif fields.alloc_size < 0:
                log.free(fields.ptr, start_ns)
            continue
        method, args = marker.records[int(event.name[len(_MARK_PREFIX):])]
        if method == "phase":
            first_phase_logged = True
        getattr(log, method)(*args, time_ns=start_ns)
    return log, step_ms
