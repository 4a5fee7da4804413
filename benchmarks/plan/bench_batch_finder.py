"""Batch-size finders under one CPU budget: memwise against power-of-two scaling, halving, and Accelerate.

Every real step of every method runs inside the same `BudgetGuard` (live tensor storages counted,
`torch.OutOfMemoryError` past the budget), so "fits" means the same thing for all of them:
- memwise: `find_batch_size` (bisection on estimates, sized for the largest input, <= 2 real steps);
- power of two (Lightning's `power` mode): from 2, double while `steps_per_trial=3` steps run;
- halving (Accelerate's classic rule): from 128, halve after every failed step;
- Accelerate: `accelerate.utils.find_executable_batch_size(starting_batch_size=128)`, its own loop
  (x0.9 per failure in accelerate 1.x); the guard's OOM is re-raised with the CPU allocator's message
  so that Accelerate recognises it.
Then each method's batch runs 50 further steps on freshly drawn (varied) inputs, same seed for all,
and the OOMs are counted. The true safe batch is the largest whose step on the workload's largest
input stays within the guard (found by bisection with real guarded steps, not counted for anyone).

Usage:
    .venv/bin/python benchmarks/plan/bench_batch_finder.py [--steps 50]
"""

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import print_table, write_rows  # noqa: E402

import memwise  # noqa: E402
from memwise.core.recipe import Mode, Recipe  # noqa: E402
from memwise.core.step import StepRunner  # noqa: E402
from memwise.measure.budget_guard import BudgetGuard  # noqa: E402
from memwise.plan import find_batch_size  # noqa: E402

# (label, spec, args, the batch whose memwise estimate sets the budget)
WORKLOADS = [
    ("gpt 4 layers, seq 64-256", "gpt", {"n_layer": 4, "block_size": 256, "seq_len": "64-256"}, 28),
    ("gpt tiny, seq 64", "gpt", {}, 48),
    # wide inputs, narrow layers: the batch matters (a default mlp's peak is its parameters and Adam state)
    ("mlp 4096-64-64", "mlp", {"width": 64, "depth": 2, "in_features": 4096}, 256),
]
START = 128


class Trials:
    """Real guarded steps of one workload, counted."""

    def __init__(self, spec: str, args: dict, budget_bytes: int) -> None:
        self.spec, self.args, self.budget_bytes = spec, args, budget_bytes
        self.workload = memwise.load_workload(spec, args)
        self.steps = 0

    def run(self, batch_size: int, steps: int, *, largest: bool = False, workload=None) -> int:
        """Runs `steps` guarded steps at `batch_size`; returns the number that ran out of memory."""
        workload = workload or self.workload
        model = copy.deepcopy(workload.model)
        runner = StepRunner(workload, Recipe(batch_size=batch_size), Mode.TRAIN, model, torch.device("cpu"))
        guard = BudgetGuard(self.budget_bytes)
        guard.track(list(model.parameters()))
        ooms = 0
        try:
            for _ in range(steps):
                self.steps += 1
                try:
                    with guard:
                        batch = (workload.make_largest_batch or workload.make_batch)(batch_size) if largest else workload.make_batch(batch_size)
                        runner.step(batch)
                        del batch
                except torch.OutOfMemoryError:
                    ooms += 1
                    runner.optimizer.zero_grad(set_to_none=True)
        finally:
            runner.close()
        return ooms


def true_safe_batch(trials: Trials) -> int:
    low, high = 0, 1
    while trials.run(high, 2, largest=True) == 0:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if trials.run(middle, 2, largest=True) == 0 else (low, middle)
    return low


def power_of_two(trials: Trials) -> int:
    batch, last_ok = 2, 0
    while batch <= 4096:
        if trials.run(batch, 3):
            break
        last_ok, batch = batch, batch * 2
    return last_ok


def halving(trials: Trials) -> int:
    batch = START
    while batch >= 1 and trials.run(batch, 1):
        batch //= 2
    return batch


def accelerate_finder(trials: Trials) -> int:
    from accelerate.utils import find_executable_batch_size

    @find_executable_batch_size(starting_batch_size=START)
    def attempt(batch_size: int) -> int:
        if trials.run(batch_size, 1):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (memwise budget guard)")
        return batch_size

    return attempt()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50, help="further steps with varied inputs per method")
    parser.add_argument("--only", default="", help="run only the workloads whose label contains this text")
    options = parser.parse_args()
    rows, json_rows = [], []
    for label, spec, args, sizing_batch in WORKLOADS:
        if options.only not in label:
            continue
        workload = memwise.load_workload(spec, args)
        largest = workload.make_largest_batch if workload.make_largest_batch else workload.make_batch
        sized = memwise.Workload(workload.model, largest, name=workload.name)
        budget = memwise.estimate(sized, Recipe(batch_size=sizing_batch)).peak_bytes
        reference = Trials(spec, args, budget)
        safe = true_safe_batch(reference)
        print(f"{label}: budget {budget} bytes, true safe batch {safe}", file=sys.stderr)

        def memwise_finder(trials: Trials) -> int:
            result = find_batch_size(trials.workload, budget)
            trials.steps += result.trials
            return result.batch_size or 0

        for method, finder in (("memwise", memwise_finder), ("power of two", power_of_two), ("halving from 128", halving),
                               ("accelerate", accelerate_finder)):
            trials = Trials(spec, args, budget)
            started = time.perf_counter()
            found = finder(trials)
            wall_s = time.perf_counter() - started
            search_steps = trials.steps
            fresh = memwise.load_workload(spec, args)  # the same seed for every method: the same 50 inputs
            ooms = trials.run(found, options.steps, workload=fresh) if found else options.steps
            rows.append([label, f"{budget / 2**20:.1f}", safe, method, found, f"{found / safe:.2f}" if safe else "-",
                         search_steps, f"{wall_s:.1f}", f"{ooms}/{options.steps}"])
            json_rows.append({"workload": label, "budget_bytes": budget, "true_safe_batch": safe, "method": method,
                              "batch_found": found, "real_steps": search_steps, "wall_s": wall_s, "ooms": ooms,
                              "further_steps": options.steps})
            print(f"  {method}: batch {found}, {search_steps} real steps, {wall_s:.1f} s, {ooms} OOMs", file=sys.stderr)
    print_table(
        "batch-size finders under one CPU budget guard",
        ["workload", "budget MiB", "true safe batch", "method", "batch found", "found/safe", "real steps (search)",
         "wall s", f"OOMs in {options.steps} varied steps"],
        rows,
    )
    write_rows("bench_batch_finder", json_rows, {"steps": options.steps, "start": START, "only": options.only})


if __name__ == "__main__":
    main()
