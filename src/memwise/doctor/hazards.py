"""Hazards: what is wrong with a loop's memory, with the evidence and a one-sentence fix.

`memwise.measure.watch` collects the evidence (allocator events, the source line of the
allocations that survive a step, hooks on forward, backward and the optimizer); this module holds
the result types, the fix for each kind and the rules that need no torch state (CUDA allocator
statistics, DataLoader workers' resident memory).
"""

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from memwise.core.serialize import from_dict, to_dict
from memwise.core.units import format_bytes

_FIXES = {
    "graph_kept": "Keep `.item()` (or `.detach()`) of the tensor instead of the tensor itself (e.g. `losses.append(loss.item())`): holding it keeps its autograd graph, and before backward its saved activations, alive across steps.",
    "tensors_accumulated": "Store `.item()`, or `.detach().cpu()` copies, or clear the list every step: it keeps every step's tensors alive.",
    "cache_never_evicts": "Bound the cache (evict old entries, e.g. an LRU of fixed size, or clear it each epoch): it never evicts, so it grows every step.",
    "zero_grad_not_none": "Call `zero_grad(set_to_none=True)` (the default since PyTorch 2.0) so gradients are freed after the step instead of held, zeroed, through the next forward.",
    "grads_not_in_optimizer": "Call `requires_grad_(False)` on the parameters you do not train (or give them to the optimizer): their gradients are computed and kept for nothing.",
    "retain_graph_unused": "Drop `retain_graph=True`: nothing backpropagates through this graph again, and retaining it keeps its saved activations alive into the next step.",
    "fp32_copy_beside_bf16": "Delete the fp32 copies once the bf16 weights are made (e.g. `del state_dict`), or hand them to the optimizer as its master weights.",
    "tied_weights_duplicated": "Tie the weights again after loading (`model.tie_weights()` for Hugging Face models, else assign one Parameter to both modules) to free the copy.",
    "eval_without_no_grad": "Run evaluation under `with torch.no_grad():` (or `torch.inference_mode()`): otherwise activations are saved for a backward that never comes.",
    "repeated_host_to_device_copy": "Copy or convert this unchanging tensor once before the loop (or register it as a buffer on the model) instead of in every step.",
    "cuda_fragmentation": "Set `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` before the first CUDA allocation so the allocator grows segments instead of stranding free blocks.",
    "dataloader_worker_rss_growth": "Keep the dataset's samples in numpy arrays or tensors instead of Python lists and dicts of objects, whose reference counts make each worker copy the pages it reads.",
}
HAZARD_KINDS = tuple(_FIXES)

# CUDA fragmentation: reserved this far above allocated, and by at least this much, is a hazard.
FRAGMENTATION_MIN_RATIO = 1.5
FRAGMENTATION_MIN_BYTES = 512 * 2**20
# DataLoader workers: resident memory growing by at least this much over the watched steps.
WORKER_RSS_MIN_GROWTH_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True, kw_only=True)
class Location:
    """A source line: `file` is a path as Python reports it, `line` is 1-based (None when unknown)."""

    file: str | None
    line: int | None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.file else "(unknown line)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hazard:
    """One memory hazard found in a watched loop.

    Attributes:
        kind: one of `HAZARD_KINDS`.
        bytes: the bytes the hazard costs: per step for growth and repeated copies, held at once
            for the others (see `message`).
        steps: the (0-based) watched steps where it was seen.
        location: the source line that allocated the memory (or made the call) at fault.
        fix: what to do, in one sentence.
        message: the evidence in words.
    """

    kind: str
    bytes: int
    steps: tuple[int, ...]
    location: Location
    fix: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Hazard":
        return from_dict(cls, data, where="hazard")


def make_hazard(kind: str, nbytes: int, steps: Sequence[int], location: Location, message: str) -> Hazard:
    """A `Hazard` of `kind` with its standard fix."""
    if kind not in _FIXES:
        raise ValueError(f"kind: unknown hazard kind {kind!r}; valid kinds are {', '.join(HAZARD_KINDS)}")
    return Hazard(kind=kind, bytes=int(nbytes), steps=tuple(sorted(set(steps))), location=location, fix=_FIXES[kind], message=message)


def fragmentation_hazard(stats: dict[str, int], step: int, location: Location) -> Hazard | None:
    """A `cuda_fragmentation` hazard when `torch.cuda.memory_stats()`-style `stats` show reserved
    memory far above allocated (at the current point and at the peak), else None.

    Assumptions:
        Reserved minus allocated that is both >= `FRAGMENTATION_MIN_BYTES` and a ratio >=
        `FRAGMENTATION_MIN_RATIO` is memory other processes and other pools cannot use.
    """
    reserved = int(stats.get("reserved_bytes.all.current", 0))
    allocated = int(stats.get("allocated_bytes.all.current", 0))
    stranded = reserved - allocated
    if allocated <= 0 or stranded < FRAGMENTATION_MIN_BYTES or reserved < FRAGMENTATION_MIN_RATIO * allocated:
        return None
    message = (
        f"the CUDA allocator reserves {format_bytes(reserved)} for {format_bytes(allocated)} allocated at step {step}: "
        f"{format_bytes(stranded)} is held in blocks too fragmented to reuse"
    )
    return make_hazard("cuda_fragmentation", stranded, [step], location, message)


def worker_rss_hazard(rss_by_step: Sequence[tuple[int, int]], location: Location, dataset: str) -> Hazard | None:
    """A `dataloader_worker_rss_growth` hazard when the DataLoader workers' summed unique resident
    memory (USS) grows by at least `WORKER_RSS_MIN_GROWTH_BYTES` from the first sample to the last, and
    the later half of the samples sits above the earlier half by at least half that growth (a
    trend, not one noisy sample; a dip from the kernel reclaiming pages does not hide it).

    Args:
        rss_by_step: (step, summed USS bytes of the worker processes), in step order.
        location: the dataset's class definition.
        dataset: the dataset's class name, for the message.
    """
    if len(rss_by_step) < 2:
        return None
    values = [rss for _, rss in rss_by_step]
    first, last = values[0], values[-1]
    growth = last - first
    half = len(values) // 2
    if growth < WORKER_RSS_MIN_GROWTH_BYTES:
        return None
    if statistics.median(values[-half:]) - statistics.median(values[:half]) < growth / 2:
        return None
    steps = [step for step, _ in rss_by_step]
    message = (
        f"DataLoader workers' resident memory grew from {format_bytes(first)} to {format_bytes(last)} over steps "
        f"{steps[0]}-{steps[-1]} (unique resident memory, psutil): {dataset} hands out Python objects that each worker copies on read"
    )
    return make_hazard("dataloader_worker_rss_growth", growth, steps, location, message)


def hazards_text(hazards: Sequence[Hazard]) -> str:
    """The hazards as plain text, one block each: kind, bytes, line, evidence and fix."""
    if not hazards:
        return "No memory hazard found."
    blocks = []
    for number, hazard in enumerate(hazards, 1):
        steps = ", ".join(str(step) for step in hazard.steps)
        blocks.append(
            f"{number}. {hazard.kind}: {format_bytes(hazard.bytes)} at {hazard.location} (steps {steps})\n"
            f"   {hazard.message}\n   fix: {hazard.fix}"
        )
    return "\n".join(blocks)
