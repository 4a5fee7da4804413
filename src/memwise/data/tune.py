"""`tune_loader`: pick DataLoader settings by measuring throughput and host memory of each candidate."""

import dataclasses
import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError
from memwise.core.serialize import from_dict, to_dict
from memwise.data.host_memory import MEMORY_METRIC, tree_pss_bytes

TIE_FRACTION = 0.10  # throughput differences below this are within the noise of short runs on shared cores


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderCandidate:
    """One DataLoader configuration and what it measured.

    Attributes:
        samples_per_s: samples per second over one full epoch of the dataset, projected from what was
            measured: the steady rate after each epoch's first batch, plus the start-up of the last
            measured epoch (worker forks every epoch; almost nothing for persistent workers).
        peak_host_bytes: the largest PSS of this process and its workers read at the end of an epoch.
        fits: `peak_host_bytes <= host_budget_bytes` (True when there is no budget).
    """

    num_workers: int
    pin_memory: bool
    prefetch_factor: int | None
    persistent_workers: bool
    samples_per_s: float
    peak_host_bytes: int
    fits: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    """The recommended DataLoader settings, measured on this machine.

    Attributes:
        batch_size: samples per batch (as given).
        num_workers, pin_memory, prefetch_factor, persistent_workers: the settings to pass to
            `torch.utils.data.DataLoader` (see `dataloader_kwargs`).
        samples_per_s: the measured throughput of this configuration.
        peak_host_bytes: its measured peak host memory (PSS of the process tree, see `memory_metric`).
        memory_metric: how host memory was counted: `pss` (shared pages split between processes).
        host_budget_bytes: the budget checked, or None.
        feasible: False when no candidate fits the budget; the fields then describe the candidate
            with the least host memory, and `reason` says why.
        reason: why this configuration was chosen.
        baseline_samples_per_s: throughput of `DataLoader(dataset, batch_size)` with its defaults
            (no workers), measured in the same run.
        candidates: every configuration tried, in the order tried.
    """

    batch_size: int
    num_workers: int
    pin_memory: bool
    prefetch_factor: int | None
    persistent_workers: bool
    samples_per_s: float
    peak_host_bytes: int
    memory_metric: str
    host_budget_bytes: int | None
    feasible: bool
    reason: str
    baseline_samples_per_s: float
    candidates: tuple[LoaderCandidate, ...]

    def dataloader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `DataLoader(dataset, **kwargs)`."""
        kwargs: dict[str, Any] = {"batch_size": self.batch_size, "num_workers": self.num_workers, "pin_memory": self.pin_memory}
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
            kwargs["persistent_workers"] = self.persistent_workers
        return kwargs

    def make_loader(self, dataset: Any, **overrides: Any) -> DataLoader:
        """A DataLoader over `dataset` with these settings (`overrides` such as `shuffle=True` win)."""
        return DataLoader(dataset, **{**self.dataloader_kwargs(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoaderConfig":
        return from_dict(cls, data, where="loader config")


def candidate_settings(cpu_count: int, cuda: bool) -> list[dict[str, Any]]:
    """The configurations `tune_loader` tries: no workers, then 1..min(cpu_count, 8) workers (powers
    of two and cpu_count) with prefetch 2 or 4, persistent or not; pinned memory only with CUDA."""
    worker_counts = sorted({n for n in (1, 2, 4, 8, cpu_count) if 1 <= n <= min(cpu_count, 8)})
    pins = (False, True) if cuda else (False,)
    settings = [{"num_workers": 0, "pin_memory": pin, "prefetch_factor": None, "persistent_workers": False} for pin in pins]
    for workers, prefetch, persistent, pin in itertools.product(worker_counts, (2, 4), (False, True), pins):
        settings.append({"num_workers": workers, "pin_memory": pin, "prefetch_factor": prefetch, "persistent_workers": persistent})
    return settings


def tune_loader(
    dataset: Any,
    batch_size: int,
    host_budget_bytes: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    *,
    max_batches: int = 12,
    epochs: int = 2,
    cpu_count: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoaderConfig:
    """Measures DataLoader configurations on `dataset` and recommends the fastest within the budget.

    Configurations within `TIE_FRACTION` (10%) of the fastest count as tied, and the one with the
    least host memory among them is recommended (fewer workers when they buy nothing).

    Each candidate (see `candidate_settings`) iterates `epochs` passes of at most `max_batches`
    batches. Its steady rate (batches after an epoch's first) and its start-up (the wait for the
    first batch beyond one batch at the steady rate) are measured apart, and projected onto a full
    epoch of the dataset, as training would see it: start-up every epoch for plain workers, only the
    reuse cost for persistent ones. A short measured window would otherwise let worker start-up hide
    what workers buy over a real epoch. The PSS of this process and its workers is read at the end
    of each epoch, off the clock, while the workers and their prefetched batches are alive.

    Args:
        dataset: a map-style dataset (`__len__` and `__getitem__`).
        batch_size: samples per batch.
        host_budget_bytes: the most host memory (PSS of the process tree) a configuration may use.
        collate_fn: passed to the DataLoader (None: PyTorch's default).
        max_batches: batches per epoch measured for each candidate (short: candidates share the CPU).
        epochs: passes per candidate (2 shows what persistent workers save).
        cpu_count: cores to plan for (default: those this process may run on).
        progress: called as `progress(done, total)` after each candidate.

    Returns:
        A `LoaderConfig`; `feasible` is False when even the leanest candidate exceeds the budget.

    Assumptions:
        The training step is not running while candidates are measured, so the numbers are the
        loader's own ceiling; with a busy main process fewer workers may be as fast.

    Known limitations:
        Timings on a shared machine are noisy (a few percent); candidates within that of each
        other are effectively tied. Memory of a dataset that grows as it is read (copy-on-read of
        Python objects in workers) is seen only as far as `max_batches` reads it.
    """
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise BadInputError(f"dataset: expected a map-style dataset with __len__ and __getitem__, got {type(dataset).__name__}")
    positive_int(batch_size, "batch_size")
    positive_int(max_batches, "max_batches")
    positive_int(epochs, "epochs")
    if len(dataset) < batch_size:
        raise BadInputError(f"batch_size: {batch_size} is larger than the dataset ({len(dataset)} samples)")
    if host_budget_bytes is not None:
        positive_int(host_budget_bytes, "host_budget_bytes")
    if collate_fn is not None and not callable(collate_fn):
        raise BadInputError(f"collate_fn: expected a callable or None, got {collate_fn!r}")
    cpus = cpu_count if cpu_count is not None else len(os.sched_getaffinity(0))
    positive_int(cpus, "cpu_count")
    settings = candidate_settings(cpus, torch.cuda.is_available())
    candidates: list[LoaderCandidate] = []
    for index, setting in enumerate(settings):
        samples_per_s, peak = _measure(dataset, batch_size, collate_fn, setting, max_batches, epochs)
        fits = host_budget_bytes is None or peak <= host_budget_bytes
        candidates.append(LoaderCandidate(**setting, samples_per_s=samples_per_s, peak_host_bytes=peak, fits=fits))
        if progress is not None:
            progress(index + 1, len(settings))
    baseline = candidates[0].samples_per_s  # num_workers=0, no pinning: DataLoader's defaults
    fitting = [candidate for candidate in candidates if candidate.fits]
    if fitting:
        fastest = max(candidate.samples_per_s for candidate in fitting)
        # Within TIE_FRACTION of the fastest is a tie on a shared machine: the leanest of those wins.
        tied = [candidate for candidate in fitting if candidate.samples_per_s >= fastest * (1 - TIE_FRACTION)]
        best = min(tied, key=lambda candidate: (candidate.peak_host_bytes, -candidate.samples_per_s))
        reason = (f"the least host memory among the {len(tied)} configurations within {TIE_FRACTION:.0%} of the fastest "
                  f"(of {len(candidates)} measured)")
        if host_budget_bytes is not None:
            reason += f" within the host budget ({len(fitting)} fit)"
    else:
        best = min(candidates, key=lambda candidate: candidate.peak_host_bytes)
        reason = (f"no configuration fits the host budget of {host_budget_bytes} bytes; the leanest needs "
                  f"{best.peak_host_bytes} bytes ({MEMORY_METRIC} of the process tree)")
    fields = {name: getattr(best, name) for name in ("num_workers", "pin_memory", "prefetch_factor", "persistent_workers",
                                                       "samples_per_s", "peak_host_bytes")}
    return LoaderConfig(
        batch_size=batch_size, **fields, memory_metric=MEMORY_METRIC, host_budget_bytes=host_budget_bytes,
        feasible=bool(fitting), reason=reason, baseline_samples_per_s=baseline, candidates=tuple(candidates),
    )


def _measure(dataset: Any, batch_size: int, collate_fn: Any, setting: dict[str, Any], max_batches: int, epochs: int) -> tuple[float, int]:
    """Projected samples/s over a full epoch (see `tune_loader`) and the peak PSS of the process tree."""
    kwargs = {key: value for key, value in setting.items() if value is not None}
    if setting["num_workers"] == 0:
        kwargs.pop("persistent_workers")
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, **kwargs)
    steady_samples, steady_s, startup_s, peak = 0, 0.0, 0.0, tree_pss_bytes()
    first_samples = 0
    for _ in range(epochs):
        started = time.perf_counter()
        iterator = iter(loader)
        first_at, count = None, 0
        for batch in itertools.islice(iterator, max_batches):
            now = time.perf_counter()
            if first_at is None:
                first_at, first_samples = now, _batch_len(batch, batch_size)
            else:
                count += _batch_len(batch, batch_size)
        ended = time.perf_counter()
        steady_samples += count
        steady_s += ended - first_at
        startup_wait = first_at - started  # the last epoch's is what every later epoch pays
        # Sampled off the clock, while this epoch's workers and their prefetched batches are alive:
        # reading /proc/*/smaps_rollup costs ~10 ms a process, too much to do while timing.
        peak = max(peak, tree_pss_bytes())
        del iterator, batch
    del loader  # persistent workers stop here
    if steady_samples == 0 or steady_s <= 0:  # one batch per epoch: nothing but the first batch to time
        return first_samples / max(startup_wait, 1e-9), peak
    rate = steady_samples / steady_s
    startup_s = max(startup_wait - first_samples / rate, 0.0)
    epoch_samples = len(dataset)
    return epoch_samples / (startup_s + epoch_samples / rate), peak


def _batch_len(batch: Any, batch_size: int) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return len(batch[0])
    if isinstance(batch, dict):
        first = next(iter(batch.values()), None)
        if isinstance(first, torch.Tensor):
            return len(first)
    return batch_size  # a custom collate's batch: count what was asked for
