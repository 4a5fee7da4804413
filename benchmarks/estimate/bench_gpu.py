"""On a real CUDA GPU: the estimate for that device against torch.cuda's own counters.

Compares `peak_bytes` with `torch.cuda.max_memory_allocated` and `reserved_bytes` with
`torch.cuda.max_memory_reserved` over the accuracy grid at larger batches (targets: 5% and 10%).
A case that runs out of memory is a row too: a correct prediction when the estimate said it does
not fit, a failed prediction (`prediction_failed`) when the estimate said it fits. Skips with a
message when CUDA is absent.

Run (on a GPU machine): python benchmarks/estimate/bench_gpu.py [--device-name H100-80GB]
"""

import argparse
import copy
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import memwise  # noqa: E402
from common import print_table, write_rows  # noqa: E402
from memwise.core.recipe import Mode  # noqa: E402
from memwise.core.step import StepRunner  # noqa: E402

WORKLOADS = [
    ("digits-cnn", {}), ("mlp", {}), ("gpt", {"preset": "tiny"}), ("gpt", {"preset": "small"}),
    ("hf:bert", {"num_hidden_layers": 4}), ("hf:gpt2", {"n_layer": 4}),
]


def measure_cuda(workload, recipe, mode: Mode, steps: int = 2) -> tuple[int, int]:
    """max_memory_allocated and max_memory_reserved over `steps` real steps, from an empty cache."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = copy.deepcopy(workload.model).to("cuda")
    runner = StepRunner(workload, recipe, mode, model, torch.device("cuda"))
    for _ in range(steps):
        runner.step()
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    del runner, model
    return allocated, reserved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-name", default=None, help="catalog name of this GPU (default: from torch)")
    options = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to compare (run this on a GPU machine)")
        return
    device_name = options.device_name or torch.cuda.get_device_name(0)
    rows = []
    for (spec, args), batch_size, precision, checkpoint in itertools.product(WORKLOADS, (8, 32, 128), ("fp32", "bf16"), ("none", "full")):
        workload = memwise.load_workload(spec, args)
        recipe = memwise.Recipe(batch_size=batch_size, precision=precision, checkpoint=checkpoint, optimizer="adamw")
        predicted = memwise.estimate(workload, recipe, device_name, what_if=False)
        try:
            allocated, reserved = measure_cuda(workload, recipe, Mode.TRAIN)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            # the device's own answer: it does not fit; the estimate must have said so
            rows.append({"workload": spec + "".join(f" {k}={v}" for k, v in args.items()), "batch_size": batch_size,
                         "precision": precision, "checkpoint": checkpoint, "estimate_allocated": predicted.peak_bytes,
                         "cuda_max_allocated": None, "allocated_error": None, "estimate_reserved": predicted.reserved_bytes,
                         "cuda_max_reserved": None, "reserved_error": None, "outcome": "out of memory",
                         "estimate_fits": predicted.fits, "prediction_failed": predicted.fits is not False})
            continue
        rows.append({"outcome": "ran", "estimate_fits": predicted.fits, "prediction_failed": predicted.fits is False,
                     "workload": spec + "".join(f" {k}={v}" for k, v in args.items()), "batch_size": batch_size, "precision": precision,
                     "checkpoint": checkpoint, "estimate_allocated": predicted.peak_bytes, "cuda_max_allocated": allocated,
                     "allocated_error": predicted.peak_bytes / allocated - 1, "estimate_reserved": predicted.reserved_bytes,
                     "cuda_max_reserved": reserved, "reserved_error": predicted.reserved_bytes / reserved - 1})
    print_table(f"estimate vs torch.cuda on {torch.cuda.get_device_name(0)}", ["workload", "batch", "precision", "checkpoint", "est allocated", "max_memory_allocated", "error", "est reserved", "max_memory_reserved", "error", "outcome"],
                [[r["workload"], r["batch_size"], r["precision"], r["checkpoint"], f"{r['estimate_allocated']:,}", _figure(r["cuda_max_allocated"]),
                  _error(r["allocated_error"]), f"{r['estimate_reserved']:,}", _figure(r["cuda_max_reserved"]), _error(r["reserved_error"])]
                 + [("FAILED PREDICTION: " if r["prediction_failed"] else "") + r["outcome"]] for r in rows])
    failed = sum(r["prediction_failed"] for r in rows)
    print(f"\nfailed fit predictions: {failed} of {len(rows)}")
    write_rows("bench_gpu", rows, {"device_name": device_name, "optimizer": "adamw", "mode": "train"})


def _figure(value: int | None) -> str:
    return "OOM" if value is None else f"{value:,}"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


if __name__ == "__main__":
    main()
