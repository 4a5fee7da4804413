"""memwise.profile against a plain torch.profiler pass, and the tracking overhead.

Prints the acceptance table of the foundation issue (peak vs reference, train and infer, fp32 and
bf16) and the step-time ratio tracked / untracked on `gpt small`, measured side by side.

Run: python benchmarks/measure/bench_tracker.py
"""

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import memwise  # noqa: E402
from common import print_table, write_rows  # noqa: E402
from memwise.core.recipe import Mode  # noqa: E402
from memwise.core.step import StepRunner  # noqa: E402

WORKLOADS = [
    ("digits-cnn", {}, 64),
    ("mlp", {}, 32),
    ("gpt", {"preset": "tiny"}, 8),
    ("hf:bert", {"num_hidden_layers": 2}, 8),
]


def accuracy_rows() -> list[dict]:
    rows = []
    for spec, args, batch_size in WORKLOADS:
        workload = memwise.load_workload(spec, args)
        for mode in ("train", "infer"):
            for precision in ("fp32", "bf16"):
                result = memwise.profile(workload, memwise.Recipe(batch_size=batch_size, precision=precision),
                                         mode=mode, steps=3, verify=True)
                rows.append({
                    "workload": spec + "".join(f" {k}={v}" for k, v in args.items()), "batch_size": batch_size,
                    "mode": mode, "precision": precision, "peak_bytes": result.peak_bytes,
                    "reference_peak_bytes": result.reference_peak_bytes,
                    "ratio": result.peak_bytes / result.reference_peak_bytes, "phase_at_peak": result.phase_at_peak,
                })
    return rows


def overhead_row(repeats: int = 3) -> dict:
    """Step time with memwise tracking / without, on gpt small, measured alternately in one process.

    Both sides start from a fresh copy of the model, run one untimed warm-up step (optimizer
    state, oneDNN caches) and then time two steps; the figure is the ratio of the medians.
    """
    workload = memwise.load_workload("gpt", {"preset": "small"})
    recipe = memwise.Recipe(batch_size=8)
    plain, tracked = [], []
    for _ in range(repeats):
        runner = StepRunner(workload, recipe, Mode.TRAIN, copy.deepcopy(workload.model), torch.device("cpu"))
        runner.step()
        for _ in range(2):
            start = time.perf_counter()
            runner.step()
            plain.append((time.perf_counter() - start) * 1e3)
        del runner
        tracked.append(memwise.profile(workload, recipe, steps=3).step_ms)  # median of steps 2 and 3
    return {"workload": "gpt small", "batch_size": 8, "plain_step_ms": statistics.median(plain),
            "tracked_step_ms": statistics.median(tracked), "overhead": statistics.median(tracked) / statistics.median(plain)}


def main() -> None:
    rows = accuracy_rows()
    print_table("profile peak vs plain torch.profiler reference", ["workload", "batch", "mode", "precision", "peak_bytes", "reference_peak_bytes", "peak / reference", "phase at peak"],
                [[r["workload"], r["batch_size"], r["mode"], r["precision"], f"{r['peak_bytes']:,}", f"{r['reference_peak_bytes']:,}", f"{r['ratio']:.4f}", r["phase_at_peak"]] for r in rows])
    overhead = overhead_row()
    print_table("tracking overhead (median step, tracked / plain, same process)", ["workload", "batch", "plain ms", "tracked ms", "ratio"],
                [[overhead["workload"], overhead["batch_size"], f"{overhead['plain_step_ms']:.1f}", f"{overhead['tracked_step_ms']:.1f}", f"{overhead['overhead']:.2f}x"]])
    path = write_rows("bench_tracker", rows + [overhead], {"steps": 3})
    print(f"\nJSON lines appended to {path}")


if __name__ == "__main__":
    main()
