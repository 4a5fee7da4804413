"""Export size, latency and parity: digits-cnn, its compressed forms, and MiniLM, for each target.

Each row exports with `memwise.export`, which runs the artifact against eager PyTorch at batch 1
and 7 (random and real batches) and times both alternately in the same process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/deploy/bench_export.py
"""

import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.utils.prune

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_rows  # noqa: E402

from memwise.core.units import format_bytes  # noqa: E402
from memwise.export import ExportError, export  # noqa: E402
from memwise.workloads.digits_cnn import digits_cnn  # noqa: E402
from memwise.workloads.minilm import minilm  # noqa: E402

SUFFIX = {"onnx": "onnx", "torch-export": "pt2", "torchscript": "pt"}


def pruned_digits():
    """digits-cnn with 50% of every conv/linear weight pruned by magnitude, made permanent."""
    workload = digits_cnn()
    for module in workload.model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.5)
            torch.nn.utils.prune.remove(module, "weight")
    workload.name = "digits-cnn pruned 50%"
    return workload


def quantized_digits():
    workload = digits_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workload.model = torch.ao.quantization.quantize_dynamic(workload.model.eval(), {torch.nn.Linear}, dtype=torch.qint8)
    workload.name = "digits-cnn int8 dynamic"
    return workload


def main() -> None:
    cases = [(digits_cnn, target) for target in SUFFIX] + [(pruned_digits, "onnx"), (pruned_digits, "torch-export")]
    cases += [(quantized_digits, target) for target in SUFFIX]
    cases += [(minilm, "onnx"), (minilm, "torch-export")]
    rows, json_rows = [], []
    with tempfile.TemporaryDirectory() as directory:
        for index, (make, target) in enumerate(cases):
            workload = make()
            path = Path(directory) / f"{index}.{SUFFIX[target]}"
            try:
                result = export(workload, target, path)
            except ExportError as error:
                rows.append([workload.name, target, "-", "-", "-", "-", "-", f"refused: {str(error)[:110]}..."])
                json_rows.append({"model": workload.name, "target": target, "error": str(error)})
                continue
            ratio = result.latency_ms["eager"] / result.latency_ms["exported"]
            rows.append([workload.name, target, format_bytes(result.size_bytes), f"{result.max_abs_diff:.2g}",
                         f"{result.latency_ms['eager']:.2f}", f"{result.latency_ms['exported']:.2f}", f"{ratio:.2f}x",
                         "pass" if result.passed else "FAIL"])
            json_rows.append({"model": workload.name, **result.to_dict()})
    print_table("export: size, parity (batch 1 and 7, random and real inputs) and latency at batch 7 (CPU)",
                ["model", "target", "file", "max abs diff", "eager ms", "exported ms", "speed-up", "verified"], rows)
    write_rows("deploy_export", json_rows, {"batch_sizes": [1, 7], "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
