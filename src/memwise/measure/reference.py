"""An independent reference for a measured peak: the allocator's own running total, nothing of memwise.

`profile(verify=True)` checks its `peak_bytes` against this. It shares no code with the tracker
(no memory log, event filter, baseline or summary): on CPU it sums the sizes of the profiler's raw
`[memory]` events in time order and keeps the maximum; on CUDA it reads
`torch.cuda.max_memory_allocated` after a reset. Whatever must count (the model's parameters) has
to be allocated inside `run`.
"""

import gc
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def reference_peak_bytes(run: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """The most bytes allocated at once while `run()` executes, above what was allocated before it.

    Returns:
        Bytes: on CPU the maximum running sum of the PyTorch profiler's memory events (allocations
        positive, frees negative); on CUDA `max_memory_allocated` minus `memory_allocated` before.
    """
    device = torch.device(device)
    gc.collect()  # garbage freed inside the window would count against the run
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    cpu = torch._C._autograd.DeviceType.CPU
    memory_events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    memory_events.sort(key=lambda event: event.start_ns())  # a stable sort keeps the order of equal times
    current = peak = 0
    for event in memory_events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
