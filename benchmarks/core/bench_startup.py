"""Start-up and estimate-without-weights figures, each in a fresh interpreter.

Start-up: `memwise --help`, `import memwise` (lazy), and what the old eager `import memwise` loaded
(estimator, profile, train, strategies), side by side in one run. Estimate without weights: the
issue's 7B Llama command (`hf:llama ... --device H100-80GB`, no `device=meta`), its wall time and
the child's peak RSS (`ru_maxrss`).

    .venv/bin/python benchmarks/core/bench_startup.py [--repeat 5] [--skip-7b]
"""

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_rows  # noqa: E402

PYTHON = sys.executable
MEMWISE = str(Path(PYTHON).with_name("memwise"))
STARTUP = {
    "memwise --help": [MEMWISE, "--help"],
    "import memwise (lazy)": [PYTHON, "-c", "import memwise"],
    "import torch": [PYTHON, "-c", "import torch"],
    "what the eager `import memwise` loaded": [
        PYTHON, "-c", "import memwise.estimate.estimator, memwise.measure.profile, memwise.train, memwise.strategies, memwise.workloads"],
}
LLAMA_7B = ["hf:llama", "--arg", "hidden_size=4096", "--arg", "intermediate_size=11008", "--arg", "num_hidden_layers=32",
            "--arg", "num_attention_heads=32", "--arg", "num_key_value_heads=32", "--arg", "vocab_size=32000",
            "--arg", "seq_len=2048", "--batch-size", "1", "--precision", "bf16", "--optimizer", "adamw",
            "--device", "H100-80GB", "--format", "json"]


def wall_s(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-7b", action="store_true")
    options = parser.parse_args()
    rows = []
    for name, command in STARTUP.items():
        times = [wall_s(command) for _ in range(options.repeat)]
        rows.append({"what": name, "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3)})
    if not options.skip_7b:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        done = subprocess.run([MEMWISE, "estimate", *LLAMA_7B], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        elapsed = time.perf_counter() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rows.append({"what": "memwise estimate 7B Llama (issue's command, what-ifs included)", "median_s": round(elapsed, 1),
                     "min_s": round(elapsed, 1), "exit_code": done.returncode,
                     "peak_rss_gib": round(peak_kib / 2**20, 2) if peak_kib > before else None})
    print_table("start-up and 7B estimate", ["what", "median s", "min s", "peak RSS GiB", "exit"],
                [[r["what"], r["median_s"], r["min_s"], r.get("peak_rss_gib", ""), r.get("exit_code", "")] for r in rows])
    write_rows("core_startup", rows, {"repeat": options.repeat})


if __name__ == "__main__":
    main()
