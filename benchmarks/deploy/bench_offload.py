"""Inference in a weight budget: memwise.offload against Accelerate's dispatch_model disk offload.

GPT-2 shapes scaled for a CPU (12 layers, width 512, 8k vocabulary: 170 MB of fp32 weights), a
budget of a quarter of the weights, batch 2 x 64 tokens. Both run in this process, one after the
other, on models with the same weights. Per method: the most parameter bytes resident at once
(a census of every parameter's storage at each module entry and exit, the same probe for both),
the rise of process RSS during a forward (sampled every 0.5 ms, after returning free heap to the
OS), the median forward latency and its ratio to the plain model, and the largest output
difference.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/deploy/bench_offload.py
"""

import ctypes
import gc
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_rows  # noqa: E402

from memwise.core.units import format_bytes  # noqa: E402
from memwise.export.offload import offload  # noqa: E402
from memwise.workloads.hf import hf  # noqa: E402

CONFIG = dict(n_embd=512, n_layer=12, n_head=8, vocab_size=8192, seq_len=64)
REPEATS = 3


def build():
    workload = hf("gpt2", **CONFIG)
    batch = workload.make_batch(2)
    batch.pop("labels")
    return workload.model.eval(), batch


def trimmed_rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss


def measure(model, batch, reference):
    """(resident weight bytes max, RSS rise during a forward, median ms, max abs diff)."""
    seen = [0]

    def census(*_):
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters() if p.device.type != "meta"}
        seen[0] = max(seen[0], sum(storages.values()))

    hooks = [m.register_forward_pre_hook(census) for m in model.modules()] + [m.register_forward_hook(census) for m in model.modules()]
    before = trimmed_rss()
    peak = [before]
    running = [True]

    def sample():
        process = psutil.Process()
        while running[0]:
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with torch.no_grad():
        output = model(**batch).logits
    running[0] = False
    sampler.join()
    for hook in hooks:
        hook.remove()
    times = []
    with torch.no_grad():
        for _ in range(REPEATS):
            start = time.perf_counter()
            model(**batch)
            times.append((time.perf_counter() - start) * 1e3)
    return seen[0], peak[0] - before, statistics.median(times), (output - reference).abs().max().item()


def main() -> None:
    model, batch = build()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = weight_bytes // 4
    with torch.no_grad():
        reference = model(**batch).logits
    rows, json_rows = [], []
    plain = measure(model, batch, reference)
    results = {"plain (all resident)": plain}

    handle = offload(model, budget, where="disk")
    results["memwise.offload (disk, mmap)"] = measure(model, batch, reference)
    handle.remove()
    del model

    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        print("accelerate is not installed: its row is skipped", file=sys.stderr)
    else:
        model, _ = build()
        device_map = infer_auto_device_map(model, max_memory={"cpu": budget, "disk": 10**15}, no_split_module_classes=["GPT2Block"])
        with tempfile.TemporaryDirectory() as directory:
            model = dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=directory)
            results["accelerate dispatch_model (disk)"] = measure(model, batch, reference)
    for name, (resident, rss_rise, ms, diff) in results.items():
        rows.append([name, format_bytes(resident), format_bytes(rss_rise), f"{ms:.1f}", f"{ms / plain[2]:.2f}x", f"{diff:.2g}"])
        json_rows.append({"method": name, "resident_weight_bytes_max": resident, "rss_rise_bytes": rss_rise, "forward_ms": ms,
                          "latency_ratio": ms / plain[2], "max_abs_diff": diff})
    print_table(f"offload: GPT-2 12x512, {format_bytes(weight_bytes)} of weights, budget {format_bytes(budget)} (1/4), batch 2x64, CPU",
                ["method", "resident weights (max)", "RSS rise in forward", "forward ms", "vs plain", "max abs diff"], rows)
    write_rows("deploy_offload", json_rows, {"config": CONFIG, "budget_bytes": budget, "weight_bytes": weight_bytes, "repeats": REPEATS})


if __name__ == "__main__":
    main()
