"""Step time of `gpt small` with and without `memwise.watch` (hazard stacks on), side by side.

Blocks of plain steps and watched steps alternate in one process on the same model and optimizer,
so the machine's load affects both alike; the ratio is of medians (the first step of each block,
a warm-up, is dropped).

    .venv/bin/python benchmarks/doctor/bench_watch_overhead.py [--steps 6] [--rounds 2] [--batch-size 4]
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import print_table, write_rows  # noqa: E402

import memwise  # noqa: E402
from memwise.core.recipe import Mode  # noqa: E402
from memwise.core.step import StepRunner  # noqa: E402


def timed_steps(runner: StepRunner, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    options = parser.parse_args()
    workload = memwise.load_workload("gpt", {"preset": "small"})
    recipe = memwise.Recipe(batch_size=options.batch_size)
    model = copy.deepcopy(workload.model)
    runner = StepRunner(workload, recipe, Mode.TRAIN, model, torch.device("cpu"))
    plain, watched, unstacked = [], [], []
    for _ in range(options.rounds):
        plain += timed_steps(runner, options.steps)
        with memwise.watch(model, runner.optimizer) as w:
            watched += timed_steps(runner, options.steps)
        assert w.result().steps == options.steps
        with memwise.watch(model, runner.optimizer, record_stacks=False):
            unstacked += timed_steps(runner, options.steps)
    plain_ms, watched_ms, unstacked_ms = (statistics.median(t) for t in (plain, watched, unstacked))
    ratio, ratio_unstacked = watched_ms / plain_ms, unstacked_ms / plain_ms
    print_table(
        f"watch overhead: gpt small, batch {options.batch_size}, CPU, {options.rounds} rounds of {options.steps} steps",
        ["plain step (ms)", "watched, stacks on (ms)", "ratio", "watched, stacks off (ms)", "ratio"],
        [[f"{plain_ms:.1f}", f"{watched_ms:.1f}", f"{ratio:.2f}x", f"{unstacked_ms:.1f}", f"{ratio_unstacked:.2f}x"]],
    )
    write_rows("doctor_watch_overhead", [{
        "plain_step_ms": plain_ms, "watched_step_ms": watched_ms, "ratio": ratio,
        "watched_no_stacks_step_ms": unstacked_ms, "ratio_no_stacks": ratio_unstacked,
    }], {"workload": "gpt small", "batch_size": options.batch_size, "steps": options.steps, "rounds": options.rounds})
    print(f"\nwatch with stacks adds {ratio:.2f}x to the step time (target <= 1.5x): {'met' if ratio <= 1.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
