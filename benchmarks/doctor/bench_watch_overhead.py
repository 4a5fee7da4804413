"""Step time of `gpt small` with and without `memwise.watch` (hazard stacks on), side by side.

Blocks of plain steps and watched steps alternate in one process on the same model and optimizer,
so the machine's load affects both alike; the ratio is of medians (the first step of each block,
a warm-up, is dropped). Wall time and the process's CPU time are both reported: on a shared
machine the CPU time (one thread) is the steadier of the two.

    .venv/bin/python benchmarks/doctor/bench_watch_overhead.py [--steps 4] [--rounds 4] [--batch-size 4]
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


def timed_steps(runner: StepRunner, steps: int) -> list[tuple[float, float]]:
    """(wall ms, CPU ms) of each step after the first."""
    times = []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        runner.step()
        times.append(((time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3))
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
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
    wall = [statistics.median(t[0] for t in block) for block in (plain, watched, unstacked)]
    cpu = [statistics.median(t[1] for t in block) for block in (plain, watched, unstacked)]
    rows = []
    for label, (plain_ms, watched_ms, unstacked_ms) in (("wall", wall), ("CPU", cpu)):
        rows.append([label, f"{plain_ms:.1f}", f"{watched_ms:.1f}", f"{watched_ms / plain_ms:.2f}x",
                     f"{unstacked_ms:.1f}", f"{unstacked_ms / plain_ms:.2f}x"])
    print_table(
        f"watch overhead: gpt small, batch {options.batch_size}, CPU, {options.rounds} rounds of {options.steps} steps",
        ["time", "plain step (ms)", "watched, stacks on (ms)", "ratio", "watched, stacks off (ms)", "ratio"], rows,
    )
    write_rows("doctor_watch_overhead", [{
        "clock": label, "plain_step_ms": values[0], "watched_step_ms": values[1], "ratio": values[1] / values[0],
        "watched_no_stacks_step_ms": values[2], "ratio_no_stacks": values[2] / values[0],
    } for label, values in (("wall", wall), ("cpu", cpu))],
        {"workload": "gpt small", "batch_size": options.batch_size, "steps": options.steps, "rounds": options.rounds})
    for label, values in (("wall", wall), ("CPU", cpu)):
        ratio = values[1] / values[0]
        print(f"{label}: watch with stacks adds {ratio:.2f}x to the step time (target <= 1.5x): {'met' if ratio <= 1.5 else 'NOT met'}")


if __name__ == "__main__":
    main()
