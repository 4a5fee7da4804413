"""The doctor over the whole hazard suite: found / missed / false alarms.

Each planted loop of tests/doctor/planted.py runs twice, with the hazard and with its fix; the
built-in workloads run clean. Found = the right kind on the planted line with bytes within 5% of
the planted size (the DataLoader row: kind and the dataset's line; its size is RSS, not planted);
a false alarm is any hazard on a fixed loop or a clean workload.

    .venv/bin/python benchmarks/doctor/bench_hazard_suite.py
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from common import print_table, write_rows  # noqa: E402

import memwise  # noqa: E402
from memwise.doctor.runner import diagnose_workload  # noqa: E402
from tests.doctor.planted import IN_PROCESS, SCRIPTED, plant_dataloader_worker_rss_growth, plant_weights  # noqa: E402


def verdict(planted) -> str:
    matching = [h for h in planted.result.hazards if h.kind == planted.kind]
    if not matching:
        return "missed"
    hazard = matching[0]
    if (hazard.location.file, hazard.location.line) != (planted.file, planted.line):
        return f"wrong line ({hazard.location.line})"
    if planted.planted_bytes and abs(hazard.bytes / planted.planted_bytes - 1) > 0.05:
        return f"bytes off ({hazard.bytes} vs {planted.planted_bytes})"
    return "found"


def main() -> None:
    directory = tempfile.mkdtemp()
    runs = {kind: plant for kind, plant in IN_PROCESS.items()}
    runs.update({kind: (lambda fixed, k=kind: plant_weights(k, fixed, directory)) for kind in SCRIPTED})
    runs["dataloader_worker_rss_growth"] = plant_dataloader_worker_rss_growth
    rows, table = [], []
    for kind, plant in runs.items():
        planted, fixed = plant(False), plant(True)
        others = [h.kind for h in planted.result.hazards if h.kind != kind]
        outcome = verdict(planted)
        false_alarms = [h.kind for h in fixed.result.hazards] + others
        size = f"{planted.planted_bytes:,}" if planted.planted_bytes else "(USS)"
        reported = next((f"{h.bytes:,}" for h in planted.result.hazards if h.kind == kind), "-")
        table.append([kind, outcome, size, reported, ", ".join(false_alarms) or "none"])
        rows.append({"kind": kind, "outcome": outcome, "planted_bytes": planted.planted_bytes,
                     "reported_bytes": reported, "false_alarms": false_alarms})
    table.append(["cuda_fragmentation", "not run (no CUDA here; rule tested on a mocked stats dict)", "-", "-", "-"])
    for spec, args in (("mlp", {}), ("gpt", {"preset": "tiny"}), ("digits-cnn", {})):
        result = diagnose_workload(memwise.load_workload(spec, args), steps=6).result
        alarms = [h.kind for h in result.hazards]
        table.append([f"clean: {spec}", "-", "-", "-", ", ".join(alarms) or "none"])
        rows.append({"kind": f"clean:{spec}", "false_alarms": alarms})
    found = sum(row[1] == "found" for row in table)
    planted_count = len(runs)
    alarms = sum(len(row.get("false_alarms", [])) for row in rows)
    print_table("memwise doctor over the hazard suite", ["hazard", "planted loop", "planted bytes", "reported bytes", "false alarms (fixed loop / clean)"], table)
    print(f"\nfound {found} of {planted_count}, missed {planted_count - found}, false alarms {alarms}")
    write_rows("doctor_hazard_suite", rows, {"steps": 6})


if __name__ == "__main__":
    main()
