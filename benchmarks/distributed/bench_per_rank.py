"""Per-rank peak: memwise's one-process estimate against the peak measured on each real rank.

2 ranks through torchrun (gloo, CPU), DDP and FSDP2, on built-in and transformers models (random
weights from a config), plus the naive count (a single process at the per-rank batch) that
misses DDP's buckets and FSDP2's sharding.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed/bench_per_rank.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed/bench_per_rank.py --only gpt --repeats 3
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_rows  # noqa: E402

import memwise  # noqa: E402
from memwise.distributed import DistributedTrainConfig, estimate_per_rank, launch_train  # noqa: E402
from memwise.workloads import load_workload  # noqa: E402

CASES = [  # (label, spec, args, global batch, optimizer)
    ("gpt-tiny", "gpt", {"preset": "tiny"}, 8, None),
    ("mlp 256x3", "mlp", {"width": 256, "depth": 3}, 8, "adamw"),  # its FSDP2 peak is in backward's prefetch
    ("mlp 1024x2", "mlp", {"width": 1024, "depth": 2}, 4, "sgd"),
    ("hf:gpt2 2L", "hf:gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}, 4, None),
    ("hf:bert 2L", "hf:bert", {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}, 4, None),
    ("hf:llama 2L", "hf:llama", {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                                  "num_key_value_heads": 2, "vocab_size": 1000}, 4, None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="run the cases whose label contains this")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="real runs per case and strategy (the measured truth varies run to run)")
    args = parser.parse_args()
    rows, records = [], []
    for label, spec, workload_args, batch_size, optimizer in CASES:
        if args.only and args.only not in label:
            continue
        recipe = memwise.Recipe(batch_size=batch_size, optimizer=optimizer)
        naive = memwise.estimate(load_workload(spec, workload_args), recipe.replace(batch_size=batch_size // args.nproc)).peak_bytes
        for strategy in ("ddp", "fsdp"):
            estimated = estimate_per_rank(load_workload(spec, workload_args), recipe, args.nproc, strategy)
            for repeat in range(args.repeats):
                run = launch_train(DistributedTrainConfig(spec=spec, args=workload_args, recipe=recipe, steps=3, strategy=strategy),
                                   args.nproc, log=lambda line: None)
                for rank in run.ranks:
                    error = estimated.peak_bytes / rank.peak_bytes - 1
                    rows.append([label, strategy, repeat, rank.rank, f"{rank.peak_bytes:,}", f"{estimated.peak_bytes:,}", f"{error:+.3%}",
                                 f"{naive / rank.peak_bytes - 1:+.2%}", f"{rank.state_bytes:,}"])
                    records.append({"case": label, "spec": spec, "args": workload_args, "batch_size": batch_size, "strategy": strategy,
                                    "repeat": repeat, "rank": rank.rank, "measured_peak_bytes": rank.peak_bytes,
                                    "estimated_peak_bytes": estimated.peak_bytes, "naive_peak_bytes": naive,
                                    "state_bytes": rank.state_bytes, "step_ms": rank.step_ms, "by_category": rank.by_category})
    print_table(f"Per-rank peak, {args.nproc} ranks (gloo, CPU), 3 steps",
                ["case", "strategy", "run", "rank", "measured peak (B)", "memwise estimate (B)", "error", "naive single-process error",
                 "params+optimizer state (B)"], rows)
    write_rows("distributed_per_rank", records, vars(args))


if __name__ == "__main__":
    main()
