"""memwise compress vs peers, side by side on the same trained models in one run.

Peers, each used as documented, one method each: Torch-Pruning alone (50% channels, then 2 epochs
of fine-tuning), torch.ao `quantize_dynamic`, torch.ao eager static int8 (conv net), torchao int8
weight-only, fp16. Sizes are the bytes of the same container (`memwise.compress.load.serialize`),
metrics the workload's `evaluate`, latencies CPU medians at batch 1 and 32 measured interleaved
with the original in one call.

    HF_HUB_OFFLINE=1 python benchmarks/compress/bench_compress.py [--workloads digits-cnn,minilm] [--budget-s 540]
"""

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import print_table, write_rows  # noqa: E402

from memwise.compress import compress, quantize  # noqa: E402
from memwise.compress.load import serialize  # noqa: E402
from memwise.compress.measure import latency_side_by_side  # noqa: E402
from memwise.compress.target import target_from_workload  # noqa: E402
from memwise.workloads import load_workload  # noqa: E402


class HalfInputs(nn.Module):
    """fp16 weights; float inputs cast to fp16 and the output back to fp32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, *args, **kwargs):
        cast = lambda value: value.half() if isinstance(value, torch.Tensor) and value.is_floating_point() else value  # noqa: E731
        out = self.model(*[cast(arg) for arg in args], **{key: cast(value) for key, value in kwargs.items()})
        return out.float()


def torch_pruning_peer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Torch-Pruning's README recipe: 50% channels by L2 magnitude (classifier kept), then 2 epochs."""
    import torch_pruning as tp

    from memwise.workloads.digits_cnn import train

    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[pruned.fc2])
    pruner.step()
    train(pruned, epochs=2, seed=0)
    return pruned.eval()


def peers(name: str, model: nn.Module, target) -> dict[str, nn.Module]:
    from torch.ao.quantization import quantize_dynamic

    out: dict[str, nn.Module] = {}
    if name == "digits-cnn":
        out["Torch-Pruning 50% + 2 epochs"] = torch_pruning_peer(model, target.inputs(2))
        calibration = [target.inputs(64) for _ in range(4)]
        out["torch.ao static int8"] = quantize.quantize_static_int8(model, calibration, calibration[0])
    with quantize._quiet_ao():
        out["torch.ao quantize_dynamic"] = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    out["torchao int8 weight-only"] = quantize.quantize_torchao_weight_only(model, bits=8)
    out["fp16"] = HalfInputs(model)
    return out


def run(name: str, budget_s: float) -> list[dict]:
    workload = load_workload(name)
    target = target_from_workload(workload)
    model = target.model
    started = time.monotonic()
    result = compress(workload, 0.01, budget_s=budget_s, out=Path("/tmp") / f"memwise-bench-compress-{name}-{int(time.time())}")
    search_s = time.monotonic() - started
    from memwise.compress import load_compressed

    models = {"original fp32": model, **peers(name, model, target), "memwise compress": load_compressed(result.path)}
    batches = {"batch_1": target.inputs(1), "batch_32": target.inputs(32)}
    latency = latency_side_by_side(models, batches, target_s=6.0)
    original_size = len(serialize(model))
    original_metric = target.evaluate(model)
    rows = []
    for label, candidate in models.items():
        size = len(serialize(candidate)) if label != "memwise compress" else Path(result.path).stat().st_size
        metric = target.evaluate(candidate)
        rows.append({
            "workload": name, "method": label, "size_bytes": size, "size_ratio": size / original_size,
            "metric": metric, "metric_drop": original_metric - metric,
            "latency_ms": latency[label], "latency_ratio_b32": latency[label]["batch_32"] / latency["original fp32"]["batch_32"],
            "latency_ratio_b1": latency[label]["batch_1"] / latency["original fp32"]["batch_1"],
            "search_s": search_s if label == "memwise compress" else None,
            "methods": [item.name for item in result.methods] if label == "memwise compress" else None,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", default="digits-cnn,minilm")
    parser.add_argument("--budget-s", type=float, default=540.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    all_rows = []
    for name in args.workloads.split(","):
        rows = run(name, args.budget_s)
        all_rows += rows
        metric_name = "accuracy" if name == "digits-cnn" else "cosine"
        print_table(
            f"{name}: saved size, {metric_name}, CPU latency (ratios to the original, measured side by side)",
            ["method", "size (bytes)", "size ratio", metric_name, "drop", "batch 1 ratio", "batch 32 ratio", "batch 32 ms"],
            [[row["method"], row["size_bytes"], f"{row['size_ratio']:.3f}x", f"{row['metric']:.4f}", f"{row['metric_drop']:+.4f}",
              f"{row['latency_ratio_b1']:.2f}x", f"{row['latency_ratio_b32']:.2f}x", f"{row['latency_ms']['batch_32']:.1f}"] for row in rows],
        )
        memwise_row = rows[-1]
        print(f"memwise search: {memwise_row['search_s']:.0f} s, methods {memwise_row['methods']}")
    write_rows("compress", all_rows, {"workloads": args.workloads, "budget_s": args.budget_s, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
