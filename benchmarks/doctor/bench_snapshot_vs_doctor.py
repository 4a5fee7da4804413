"""What torch's own memory tools show for a planted leak, beside what `memwise doctor` says.

On CUDA, torch's tool is the memory snapshot (`torch.cuda.memory._record_memory_history` +
`_snapshot`, viewed at pytorch.org/memory_viz); on CPU it is the profiler's memory columns
(`torch.profiler.profile(profile_memory=True)`), printed here as torch prints them. Neither names a
hazard: they list allocations and their sizes, and the user has to spot the pattern.

    .venv/bin/python benchmarks/doctor/bench_snapshot_vs_doctor.py
"""

import runpy
import subprocess
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

SCRIPT = Path(__file__).resolve().parent / "leaky_train.py"


def torch_view() -> str:
    if torch.cuda.is_available():
        torch.cuda.memory._record_memory_history()
        runpy.run_path(str(SCRIPT), run_name="__main__")
        snapshot = torch.cuda.memory._snapshot()
        return f"torch.cuda.memory._snapshot(): {len(snapshot['segments'])} segments, {sum(len(t) for t in snapshot['device_traces'])} trace entries"
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=12, max_name_column_width=40)


def main() -> None:
    print("## torch's view (torch.profiler, profile_memory=True)\n")
    print(torch_view())
    print("\n## memwise doctor\n")
    completed = subprocess.run([sys.executable, "-m", "memwise.cli.main", "doctor", str(SCRIPT)], capture_output=True, text=True)
    print(completed.stdout)
    print(f"(exit status {completed.returncode})")


if __name__ == "__main__":
    main()
