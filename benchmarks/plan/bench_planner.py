"""The planner against an exhaustive measured search over the same knob grid, at three budgets.

For each workload, every recipe of the grid is measured with `memwise.profile` (allocator peak over
two real steps) and timed separately: one runner per recipe, all warmed up, then `--rounds` rounds
that each time one step of every recipe in a rotated order (interleaved, so a burst of load on the
shared machine hits every recipe alike); a recipe's time is the median of its rounds. For each budget the best fitting recipe is the measured fastest
whose measured peak is within the budget. The planner searches the same grid on estimates, with its
calibrated step-time model, and confirms with real steps. Reported: the planner's chosen recipe,
its measured step time against the best's (target: within 15%), its real steps (confirmation, and
calibration timing) and wall time against the exhaustive search's.

Usage:
    .venv/bin/python benchmarks/plan/bench_planner.py            # gpt small (seq 128) and hf:bert (4 layers)
    .venv/bin/python benchmarks/plan/bench_planner.py --quick    # smaller grid
"""

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import print_table, write_rows  # noqa: E402

import memwise  # noqa: E402
from memwise.core.recipe import Recipe  # noqa: E402
from memwise.plan import Planner  # noqa: E402
from memwise.plan.planner import recipe_text  # noqa: E402
from memwise.plan.step_time import time_side_by_side  # noqa: E402

WORKLOADS = {
    "gpt small (seq 64)": ("gpt", {"preset": "small", "seq_len": 64}),
    "hf:bert (4 layers, width 256, seq 64)": ("hf:bert", {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                                                           "intermediate_size": 1024, "seq_len": 64}),
}
BATCH = 8


def grid(quick: bool) -> dict:
    allow = {
        "micro_batch_size": [8, 4, 2] if not quick else [8, 2],
        "precision": ["fp32"],
        "checkpoint": ["none", "full"] if quick else ["none", "selective", "full"],
        "optimizer_state": ["fp32", "8bit"],
    }
    from memwise.plan.remedies import HAS_OPTIMIZER_IMPL

    if HAS_OPTIMIZER_IMPL:
        allow["optimizer_impl"] = ["fused"]
    return allow


def grid_recipes(allow: dict) -> list[Recipe]:
    recipes = []
    for micro, precision, checkpoint, state in itertools.product(allow["micro_batch_size"], allow["precision"], allow["checkpoint"],
                                                                 allow["optimizer_state"]):
        fields = dict(batch_size=BATCH, micro_batch_size=None if micro == BATCH else micro, precision=precision,
                      checkpoint=checkpoint, optimizer_state=state)
        if "optimizer_impl" in allow and state == "fp32":
            fields["optimizer_impl"] = allow["optimizer_impl"][0]
        recipes.append(Recipe(**fields))
    return recipes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="run only the workloads whose label contains this text")
    parser.add_argument("--steps", type=int, default=2, help="real steps per grid recipe for its measured peak")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed steps per grid recipe (median)")
    options = parser.parse_args()
    torch.manual_seed(0)
    load_start = list(os.getloadavg())
    allow = grid(options.quick)
    rows, json_rows = [], []
    for label, (spec, args) in WORKLOADS.items():
        if options.only not in label:
            continue
        workload = memwise.load_workload(spec, args)
        started = time.perf_counter()
        measured = {}
        step_ms = time_side_by_side(workload, grid_recipes(allow), options.rounds)
        for recipe in grid_recipes(allow):
            result = memwise.profile(workload, recipe, steps=options.steps)
            measured[recipe] = (result.peak_bytes, step_ms[recipe])
            print(f"{label}: {recipe_text(recipe)}: peak {result.peak_bytes}, {step_ms[recipe]:.0f} ms", file=sys.stderr)
        exhaustive_s = time.perf_counter() - started
        exhaustive_steps = (options.steps + 1 + options.rounds) * len(measured)
        peaks = sorted(peak for peak, _ in measured.values())
        plain_peak = measured[grid_recipes(allow)[0]][0]
        # roomy: the plain recipe fits with the planner's 5% margin and 5% to spare
        budgets = {"roomy": int(plain_peak / 0.9), "mid": int((peaks[0] + plain_peak) / 2), "tight": int(peaks[0] / 0.9)}
        planner_started = time.perf_counter()
        planner = Planner(workload, effective_batch_size=BATCH, allow=allow)
        for budget_name, budget in budgets.items():
            fitting = {recipe: value for recipe, value in measured.items() if value[0] <= budget}
            best = min(fitting, key=lambda recipe: fitting[recipe][1])
            began = time.perf_counter()
            plan = planner.plan(budget)
            plan_s = time.perf_counter() - began + (planner.time_model().calibration_s if budget_name == "roomy" else 0.0)
            chosen = plan.recipe
            chosen_ms = measured.get(chosen, (None, None))[1]
            ratio = chosen_ms / fitting[best][1] if chosen_ms is not None else None
            rows.append([
                label, budget_name, f"{budget / 2**20:.1f}", recipe_text(best).replace("batch_size=8, ", ""),
                f"{fitting[best][1]:.0f}", recipe_text(chosen).replace("batch_size=8, ", "") if plan.feasible else "infeasible",
                f"{chosen_ms:.0f}" if chosen_ms else "-", f"{ratio:.2f}" if ratio else "-",
                "yes" if plan.measured_peak_bytes is not None and plan.measured_peak_bytes <= budget else "no",
                f"{plan.real_steps} (+{plan.calibration_steps - (0 if budget_name == 'roomy' else planner.time_model().measured_steps)} timed)",
                f"{plan_s:.0f}", f"{exhaustive_steps}", f"{exhaustive_s:.0f}",
            ])
            json_rows.append({"workload": label, "budget_name": budget_name, "budget_bytes": budget, "best_recipe": best.to_dict(),
                              "best_step_ms": fitting[best][1], "plan_recipe": chosen.to_dict(), "plan_step_ms": chosen_ms,
                              "throughput_ratio": ratio, "plan_measured_peak_bytes": plan.measured_peak_bytes,
                              "plan_real_steps": plan.real_steps, "calibration_steps": plan.calibration_steps,
                              "plan_estimates": plan.estimates, "plan_s": plan_s,
                              "exhaustive_steps": exhaustive_steps, "exhaustive_s": exhaustive_s})
        print(f"{label}: planner total {time.perf_counter() - planner_started:.0f} s", file=sys.stderr)
        print(rows[-3:], file=sys.stderr, flush=True)  # kept if a later workload is interrupted
    print_table(
        "planner vs exhaustive measured grid (CPU, effective batch 8)",
        ["workload", "budget", "MiB", "best fitting (measured)", "best ms", "planner's choice", "its ms", "its/best ms",
         "fits (measured)", "planner real steps", "planner s", "exhaustive steps", "exhaustive s"],
        rows,
    )
    write_rows("bench_planner", json_rows, {"batch": BATCH, "allow": {k: list(map(str, v)) for k, v in allow.items()},
                                            "steps": options.steps, "rounds": options.rounds, "quick": options.quick,
                                            "only": options.only, "load_average_start": load_start, "load_average_end": list(os.getloadavg())})


if __name__ == "__main__":
    main()
