"""Shared by the benchmarks: environment facts, a printed table, JSON lines appended to results/."""

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"git_sha": sha, "torch_version": torch.__version__, "device": device, "python": sys.version.split()[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_rows(name: str, rows: list[dict[str, Any]], config: dict[str, Any]) -> Path:
    """Appends one JSON line per row, each with the environment and the run's config."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.jsonl"
    env = environment()
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps({**env, "config": config, **row}) + "\n")
    return path


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A Markdown table on stdout (pasteable into docs/benchmarks.md)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    sys.stdout.flush()
