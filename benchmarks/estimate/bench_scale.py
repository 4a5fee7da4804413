"""Estimating very large models without their weights: time and peak RSS of this process.

Llama-style 7B (hidden 4096, 32 layers, intermediate 11008, 32 heads, vocab 32000, seq 2048) and
70B (8192, 80 layers, 28672, 64 heads, 8 KV heads, vocab 32000, seq 4096), training with AdamW
and bf16 autocast, batch 1, on an H100-80GB target, what-ifs included (the whole answer of
`memwise estimate`). The workload is built as `estimate` builds it (parameters on the meta
device). Each model runs in a fresh subprocess so its peak RSS is its own; `cpu_s` is the
process's CPU time (what the wall time is on an idle machine), `elapsed_s` the wall time of
building plus estimating.

Run: python benchmarks/estimate/bench_scale.py [--only llama-7b]
"""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_rows  # noqa: E402

MODELS = {
    "llama-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "seq_len": 2048},
    "llama-70b": {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "num_attention_heads": 64,
                  "num_key_value_heads": 8, "seq_len": 4096},
}

CHILD = r"""
import json, resource, sys, time
import memwise
args = json.loads(sys.argv[1])
started, cpu_started = time.perf_counter(), time.process_time()
workload = memwise.load_workload("hf:llama", args, materialize=False)
result = memwise.estimate(workload, memwise.Recipe(batch_size=1, precision="bf16", optimizer="adamw"), "H100-80GB")
print(json.dumps({"elapsed_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started,
                  "estimate_s": result.elapsed_s, "what_ifs": len(result.what_if),
                  "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_bytes": result.peak_bytes, "reserved_bytes": result.reserved_bytes, "total_bytes": result.total_bytes,
                  "fits": result.fits, "param_bytes": result.by_category["param"]}))
"""


def main() -> None:
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    rows = []
    for name, sizes in MODELS.items():
        if only and name != only:
            continue
        args = {**sizes, "vocab_size": 32000, "max_position_embeddings": 4096}
        completed = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, check=True)
        rows.append({"model": name, **json.loads(completed.stdout.strip().splitlines()[-1])})
    gib = 2**30
    print_table("estimate of a training step with what-ifs (AdamW, bf16 autocast, batch 1) for H100-80GB",
                ["model", "wall s", "CPU s", "estimate s", "what-ifs", "max RSS", "params (fp32)", "peak allocated", "reserved", "fits"],
                [[r["model"], f"{r['elapsed_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['estimate_s']:.1f}", r["what_ifs"], f"{r['max_rss_bytes'] / gib:.2f} GiB", f"{r['param_bytes'] / gib:.1f} GiB", f"{r['peak_bytes'] / gib:.1f} GiB",
                  f"{r['reserved_bytes'] / gib:.1f} GiB", r["fits"]] for r in rows])
    path = write_rows("bench_scale", rows, {"batch_size": 1, "precision": "bf16", "optimizer": "adamw", "device": "H100-80GB", "what_if": True})
    print(f"\nJSON lines appended to {path}")


if __name__ == "__main__":
    main()
