"""The memory log: an ordered stream of allocations, frees and step context, and its summary.

Both the measurement (allocator events from the PyTorch profiler) and the estimator (synthetic
events from fake tensors) write a `MemoryLog`; `summarize` turns either into the same `Breakdown`,
so a profile and an estimate are classified by exactly the same rules.

Categories (what the bytes live for):
    param, buffer     model parameters and buffers.
    grad              storages that become a parameter's `.grad`.
    optimizer_state   storages held in `optimizer.state`.
    input             the batch made by `make_batch`.
    activation        train: made in forward and still alive when backward starts (saved for
                      backward); infer: outputs of modules (alive when the module that made them
                      returns).
    temporary         everything else: intermediates freed inside forward, backward temporaries,
                      kernel workspaces, the optimizer's scratch.
"""

import dataclasses
from typing import Any

from memwise.core.serialize import from_dict, to_dict

CATEGORIES = ("param", "buffer", "grad", "optimizer_state", "activation", "temporary", "input")
HOST = "host"  # offloaded to host memory: logged, but not part of the device's totals
PHASES = ("forward", "backward", "optimizer", "idle")
ROOT_MODULE = "(root)"
_MAX_TIMELINE_SAMPLES = 1200


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModuleMemory:
    """Bytes held for one module at the peak (its submodules included)."""

    module: str
    param_bytes: int
    grad_bytes: int
    activation_bytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timeline:
    """Live bytes by category through the measured steps, downsampled with the peak kept.

    `x` is milliseconds since the first step for a measurement, the event index for an estimate
    (`x_unit` says which).
    """

    x: tuple[float, ...]
    x_unit: str
    phase: tuple[str, ...]
    bytes_by_category: dict[str, tuple[int, ...]]
    peak_index: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Breakdown:
    """Summary of a memory log: the peak and what it is made of.

    `notes` are what the recipe's strategies told the user about this run (e.g. a setting that
    does nothing on this device).
    """

    peak_bytes: int
    baseline_bytes: int
    by_category: dict[str, int]
    by_module: tuple[ModuleMemory, ...]
    phase_at_peak: str
    step_at_peak: int
    timeline: Timeline
    notes: tuple[str, ...] = ()

    def breakdown_fields(self) -> dict[str, Any]:
        """This breakdown's own fields, to build a result (Profile, Estimate) that extends it."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(Breakdown)}

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return from_dict(cls, data, where=cls.__name__.lower())


@dataclasses.dataclass
class _Allocation:
    nbytes: int
    phase: str
    step: int
    module: str | None
    frame: int
    category: str | None = None
    survived_forward: bool = False
    freed_inside_module: bool = False


class MemoryLog:
    """An ordered stream of memory events for one run of steps.

    Keys identify allocations (a data pointer, or any hashable for synthetic events); a key may be
    reused after it is freed. Frees of unknown keys are ignored: the allocator reports frees of
    storages made before the log started, which the log never saw allocated.
    """

    def __init__(self, *, mode: str, module_names: list[str] | None = None) -> None:
        self.mode = mode
        self.module_names = list(module_names or [])
        self.events: list[tuple[Any, ...]] = []
        self.times_ns: list[int | None] = []
        self.notes: list[str] = []  # the strategies' notes on the run (Handle.notes), kept in the summary

    def _add(self, event: tuple[Any, ...], time_ns: int | None) -> None:
        self.events.append(event)
        self.times_ns.append(time_ns)

    def remove_event(self, index: int) -> None:
        """Drops one event (an estimator correcting what it saw, e.g. an add that was really in place)."""
        del self.events[index]
        del self.times_ns[index]

    def preexisting(self, key: Any, nbytes: int, category: str, module: str | None = None) -> None:
        """An allocation alive before the first step (parameters, buffers)."""
        self._add(("alloc", key, int(nbytes), category, module), None)

    def alloc(self, key: Any, nbytes: int, time_ns: int | None = None, *, category: str | None = None) -> None:
        """An allocation; `category` fixes its category up front (e.g. HOST for offloaded memory)."""
        self._add(("alloc", key, int(nbytes), category, None), time_ns)

    def free(self, key: Any, time_ns: int | None = None) -> None:
        self._add(("free", key), time_ns)

    def phase(self, name: str, step: int, time_ns: int | None = None) -> None:
        self._add(("phase", name, step), time_ns)

    def enter(self, module: str, time_ns: int | None = None) -> None:
        self._add(("enter", module), time_ns)

    def exit(self, module: str, time_ns: int | None = None) -> None:
        self._add(("exit", module), time_ns)

    def mark(self, label: str, module: str, time_ns: int | None = None) -> None:
        """A point in the step that the summary ignores (e.g. where a block's backward starts), for
        transforms of the log such as `memwise.distributed.estimate`'s FSDP2 replay."""
        self._add(("mark", label, module), time_ns)

    def claim(self, category: str, keys_and_modules: list[tuple[Any, str | None]], time_ns: int | None = None) -> None:
        """Says the live allocations at `keys` hold `category` (e.g. gradients), owned by those modules."""
        self._add(("claim", category, list(keys_and_modules)), time_ns)

    def summarize(self) -> Breakdown:
        """Classifies every allocation and returns the peak and its breakdown."""
        allocations = self._classify()
        return self._replay(allocations)

    def _classify(self) -> list[_Allocation | None]:
        """First pass: the `_Allocation` made by each alloc event (None for other events), with its category."""
        by_event: list[_Allocation | None] = [None] * len(self.events)
        live: dict[Any, _Allocation] = {}
        phase, step = "idle", -1
        frames: list[tuple[int, str]] = []
        open_frames: set[int] = set()
        next_frame = 0
        for index, event in enumerate(self.events):
            kind = event[0]
            if kind == "alloc":
                _, key, nbytes, category, module = event
                innermost = frames[-1] if frames else (-1, None)
                record = _Allocation(
                    nbytes=nbytes, phase=phase, step=step,
                    module=module if category is not None else innermost[1],
                    frame=innermost[0], category=category,
                )
                live[key] = record
                by_event[index] = record
            elif kind == "free":
                record = live.pop(event[1], None)
                if record is not None and record.frame in open_frames:
                    record.freed_inside_module = True
            elif kind == "phase":
                _, phase, step = event
                if phase == "backward":
                    for record in live.values():
                        if record.phase == "forward" and record.step == step:
                            record.survived_forward = True
            elif kind == "enter":
                frames.append((next_frame, event[1]))
                open_frames.add(next_frame)
                next_frame += 1
            elif kind == "exit":
                while frames:
                    frame_id, name = frames.pop()
                    open_frames.discard(frame_id)
                    if name == event[1]:
                        break
            elif kind == "claim":
                _, category, keys_and_modules = event
                for key, module in keys_and_modules:
                    record = live.get(key)
                    if record is not None and record.category is None:
                        record.category = category
                        if module is not None:
                            record.module = module
        for record in by_event:
            if record is not None and record.category is None:
                record.category = self._default_category(record)
        return by_event

    def _default_category(self, record: _Allocation) -> str:
        if record.phase != "forward":
            return "temporary"
        if self.mode == "train":
            return "activation" if record.survived_forward else "temporary"
        return "temporary" if record.freed_inside_module else "activation"

    def _replay(self, by_event: list[_Allocation | None]) -> Breakdown:
        """Second pass: live bytes by category after every event; the first maximum is the peak."""
        live: dict[Any, _Allocation] = {}
        totals = dict.fromkeys(CATEGORIES, 0)
        total = 0
        baseline: int | None = None
        peak_total, peak_event = -1, 0
        peak_totals: dict[str, int] = dict(totals)
        peak_live: list[_Allocation] = []
        phase, step = "idle", -1
        peak_phase, peak_step = "idle", -1
        samples: list[tuple[int, str, int, tuple[int, ...]]] = []
        for index, event in enumerate(self.events):
            kind = event[0]
            if kind == "alloc":
                record = by_event[index]
                if record.category == HOST:
                    continue
                previous = live.get(event[1])
                if previous is not None:  # a key reused without a seen free: the old block is gone
                    totals[previous.category] -= previous.nbytes
                    total -= previous.nbytes
                live[event[1]] = record
                totals[record.category] += record.nbytes
                total += record.nbytes
            elif kind == "free":
                record = live.pop(event[1], None)
                if record is None:
                    continue
                totals[record.category] -= record.nbytes
                total -= record.nbytes
            elif kind == "phase":
                _, phase, step = event
                if baseline is None:
                    baseline = total
            else:
                continue
            if baseline is None:
                continue
            if total > peak_total:
                peak_total, peak_event = total, index
                peak_totals = dict(totals)
                peak_live = list(live.values())
                peak_phase, peak_step = phase, step
            samples.append((index, phase, total, tuple(totals[c] for c in CATEGORIES)))
        if baseline is None:
            baseline = total
        if peak_total < 0:
            peak_total, peak_totals, peak_live = total, dict(totals), list(live.values())
        return Breakdown(
            peak_bytes=max(peak_total, 0),
            baseline_bytes=baseline,
            by_category=peak_totals,
            by_module=self._by_module(peak_live),
            phase_at_peak=peak_phase if peak_phase != "idle" else "forward",
            step_at_peak=max(peak_step, 0),
            timeline=self._timeline(samples, peak_event),
            notes=tuple(self.notes),
        )

    def _by_module(self, peak_live: list[_Allocation]) -> tuple[ModuleMemory, ...]:
        sums: dict[str, list[int]] = {name: [0, 0, 0] for name in [ROOT_MODULE, *self.module_names]}
        slot = {"param": 0, "grad": 1, "activation": 2}
        for record in peak_live:
            if record.category not in slot:
                continue
            for name in _ancestors(record.module):
                sums.setdefault(name, [0, 0, 0])[slot[record.category]] += record.nbytes
        return tuple(
            ModuleMemory(module=name, param_bytes=values[0], grad_bytes=values[1], activation_bytes=values[2])
            for name, values in sums.items()
            if any(values)
        )

    def _timeline(self, samples: list[tuple[int, str, int, tuple[int, ...]]], peak_event: int) -> Timeline:
        if not samples:
            return Timeline(x=(), x_unit="event", phase=(), bytes_by_category={c: () for c in CATEGORIES}, peak_index=0)
        stride = max(1, -(-len(samples) // _MAX_TIMELINE_SAMPLES))
        kept = []
        for start in range(0, len(samples), stride):
            bucket = samples[start:start + stride]
            peak_in_bucket = [s for s in bucket if s[0] == peak_event]
            kept.append(peak_in_bucket[0] if peak_in_bucket else max(bucket, key=lambda s: s[2]))
        times = self.times_ns
        first_time = next((t for t in times if t is not None), None)
        if first_time is not None and all(times[s[0]] is not None for s in kept):
            x = tuple((times[s[0]] - first_time) / 1e6 for s in kept)
            unit = "ms"
        else:
            x = tuple(float(s[0]) for s in kept)
            unit = "event"
        peak_index = next(i for i, s in enumerate(kept) if s[0] == peak_event) if any(s[0] == peak_event for s in kept) else 0
        return Timeline(
            x=x,
            x_unit=unit,
            phase=tuple(s[1] for s in kept),
            bytes_by_category={c: tuple(s[3][i] for s in kept) for i, c in enumerate(CATEGORIES)},
            peak_index=peak_index,
        )


def _ancestors(module: str | None) -> list[str]:
    if not module or module == ROOT_MODULE:
        return [ROOT_MODULE]
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)] + [ROOT_MODULE]
