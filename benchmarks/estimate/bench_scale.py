"""Estimating very large models without their weights: time and peak RSS of this process.

Llama-style 7B (hidden 4096, 32 layers, intermediate 11008, vocab 32000) and 13B (5120, 40,
13824, 32000), training with AdamW and bf16 autocast, batch 1, sequence 2048, on an H100-80GB
target. Each model runs in a fresh subprocess so its peak RSS is its own.

Run: python benchmarks/estimate/bench_scale.py
"""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_rows  # noqa: E402

MODELS = {
    "llama-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008, "num_attention_heads": 32},
    "llama-13b": {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 13824, "num_attention_heads": 40},
}

CHILD = r"""
import json, resource, sys, time
import memwise
args = json.loads(sys.argv[1])
started = time.perf_counter()
workload = memwise.load_workload("hf:llama", args)
result = memwise.estimate(workload, memwise.Recipe(batch_size=1, precision="bf16", optimizer="adamw"), "H100-80GB", what_if=False)
print(json.dumps({"elapsed_s": time.perf_counter() - started, "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_bytes": result.peak_bytes, "reserved_bytes": result.reserved_bytes, "total_bytes": result.total_bytes,
                  "fits": result.fits, "param_bytes": result.by_category["param"]}))
"""


def main() -> None:
    rows = []
    for name, sizes in MODELS.items():
        args = {**sizes, "num_key_value_heads": sizes["num_attention_heads"], "vocab_size": 32000, "seq_len": 2048,
                "max_position_embeddings": 4096, "device": "meta"}
        completed = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, check=True)
        rows.append({"model": name, **json.loads(completed.stdout.strip().splitlines()[-1])})
    gib = 2**30
    print_table("estimate of a training step (AdamW, bf16 autocast, batch 1, seq 2048) for H100-80GB", ["model", "estimate s", "max RSS", "params (fp32)", "peak allocated", "reserved", "fits"],
                [[r["model"], f"{r['elapsed_s']:.1f}", f"{r['max_rss_bytes'] / gib:.2f} GiB", f"{r['param_bytes'] / gib:.1f} GiB", f"{r['peak_bytes'] / gib:.1f} GiB",
                  f"{r['reserved_bytes'] / gib:.1f} GiB", r["fits"]] for r in rows])
    path = write_rows("bench_scale", rows, {"batch_size": 1, "seq_len": 2048, "precision": "bf16", "optimizer": "adamw", "device": "H100-80GB"})
    print(f"\nJSON lines appended to {path}")


if __name__ == "__main__":
    main()
