"""What resuming and budget checks cost in `memwise.train`, side by side with the run they protect.

For each workload: the mean step time of an uninterrupted run; the time to replay make_batch for the
finished steps on resume and to write one checkpoint (and its size); whether the resumed run is
bit-equal to the uninterrupted one; and the --budget minimum (an estimate of a micro-batch-1 step)
against the budget guard's own peak of a batch-1 run, with the time the estimate takes.

Run: HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train/bench_resume.py
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import memwise  # noqa: E402
from common import print_table, write_rows  # noqa: E402
from memwise.train.checkpoint_io import CheckpointDirectory  # noqa: E402
from memwise.train.runner import InfeasibleBudgetError, _Run  # noqa: E402

STEPS = 10
CASES = [
    ("gpt", {"preset": "tiny", "seq_len": 64}, memwise.Recipe(batch_size=8, optimizer="adamw")),
    ("mlp", {}, memwise.Recipe(batch_size=64, optimizer="sgd")),
    ("digits-cnn", {}, memwise.Recipe(batch_size=64, optimizer="adamw")),
]


def timed(method_name: str, timings: list[float]):
    original = getattr(_Run, method_name)

    def wrapper(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            timings.append((time.perf_counter() - started) * 1e3)

    return original, wrapper


def run_case(name: str, args: dict, recipe: memwise.Recipe) -> dict:
    whole_workload = memwise.load_workload(name, args)
    started = time.perf_counter()
    whole = memwise.train(whole_workload, recipe, STEPS, seed=0)
    step_ms = (time.perf_counter() - started) * 1e3 / STEPS

    replay_ms, save_ms = [], []
    originals = {}
    for method, timings in (("_replay_batches", replay_ms), ("_save", save_ms)):
        originals[method], wrapper = timed(method, timings)
        setattr(_Run, method, wrapper)
    try:
        with tempfile.TemporaryDirectory() as directory:
            memwise.train(memwise.load_workload(name, args), recipe, STEPS // 2, seed=0, checkpoint_dir=directory)
            size = CheckpointDirectory(directory).checkpoints()[0].stat().st_size
            resumed_workload = memwise.load_workload(name, args)
            resumed = memwise.train(resumed_workload, recipe, STEPS, seed=0, checkpoint_dir=directory, resume=True)
    finally:
        for method, original in originals.items():
            setattr(_Run, method, original)
    equal = resumed.loss_history == whole.loss_history and all(
        torch.equal(a, b) for a, b in zip(whole_workload.model.state_dict().values(), resumed_workload.model.state_dict().values()))

    one = recipe.replace(batch_size=1, micro_batch_size=None)
    measured = max(m.peak_bytes for m in memwise.train(memwise.load_workload(name, args), one, 2).memory)
    minimum_ms = []
    original, wrapper = timed("_minimum_bytes", minimum_ms)
    _Run._minimum_bytes = wrapper
    try:
        memwise.train(memwise.load_workload(name, args), recipe, STEPS, budget_bytes=1)
    except InfeasibleBudgetError as error:
        minimum = error.minimum_bytes
    finally:
        _Run._minimum_bytes = original
    return {
        "workload": name, "step_ms": step_ms, "replay_ms_per_step": replay_ms[0] / (STEPS // 2),
        "save_ms": sum(save_ms) / len(save_ms), "checkpoint_bytes": size, "resumed_bit_equal": equal,
        "minimum_bytes": minimum, "measured_batch1_peak_bytes": measured, "minimum_over_measured": minimum / measured,
        "minimum_estimate_ms": minimum_ms[0],
    }


def main() -> None:
    rows = [run_case(*case) for case in CASES]
    print_table(
        f"memwise train: resume and budget-check costs ({STEPS} steps, CPU)",
        ["workload", "step ms", "replay ms/step", "save ms", "checkpoint", "resumed bit-equal", "minimum / batch-1 peak", "minimum estimate ms"],
        [[r["workload"], f"{r['step_ms']:.1f}", f"{r['replay_ms_per_step']:.2f}", f"{r['save_ms']:.1f}",
          f"{r['checkpoint_bytes'] / 2**20:.2f} MiB", r["resumed_bit_equal"], f"{r['minimum_over_measured']:.4f}",
          f"{r['minimum_estimate_ms']:.0f}"] for r in rows],
    )
    write_rows("train_resume", rows, {"steps": STEPS, "cases": [(name, args, recipe.to_dict()) for name, args, recipe in CASES]})


if __name__ == "__main__":
    main()
