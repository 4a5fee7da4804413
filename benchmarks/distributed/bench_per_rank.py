"""Per-rank peak: memwise's one-process estimate against the peak measured on each real rank.

2 ranks through torchrun (gloo, CPU), gpt preset tiny, DDP and FSDP2, plus the naive count (a
single process at the per-rank batch) that misses DDP's buckets.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/distributed/bench_per_rank.py
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_rows  # noqa: E402

import memwise  # noqa: E402
from memwise.distributed import DistributedTrainConfig, estimate_per_rank, launch_train  # noqa: E402
from memwise.workloads import load_workload  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    workload_args = {"preset": args.preset}
    recipe = memwise.Recipe(batch_size=args.batch_size)
    naive = memwise.estimate(load_workload("gpt", workload_args), memwise.Recipe(batch_size=args.batch_size // args.nproc)).peak_bytes
    rows, records = [], []
    for strategy in ("ddp", "fsdp"):
        estimated = estimate_per_rank(load_workload("gpt", workload_args), recipe, args.nproc, strategy)
        run = launch_train(DistributedTrainConfig(spec="gpt", args=workload_args, recipe=recipe, steps=3, strategy=strategy),
                           args.nproc, log=lambda line: None)
        for rank in run.ranks:
            error = estimated.peak_bytes / rank.peak_bytes - 1
            rows.append([strategy, rank.rank, f"{rank.peak_bytes:,}", f"{estimated.peak_bytes:,}", f"{error:+.2%}",
                         f"{naive / rank.peak_bytes - 1:+.2%}", f"{rank.state_bytes:,}", f"{rank.step_ms:.0f}"])
            records.append({"strategy": strategy, "rank": rank.rank, "measured_peak_bytes": rank.peak_bytes,
                            "estimated_peak_bytes": estimated.peak_bytes, "naive_peak_bytes": naive,
                            "state_bytes": rank.state_bytes, "step_ms": rank.step_ms, "by_category": rank.by_category})
    print_table(f"Per-rank peak, gpt-{args.preset}, global batch {args.batch_size}, {args.nproc} ranks (gloo, CPU)",
                ["strategy", "rank", "measured peak (B)", "memwise estimate (B)", "error", "naive single-process error",
                 "params+optimizer state (B)", "step ms"], rows)
    write_rows("distributed_per_rank", records, vars(args))


if __name__ == "__main__":
    main()
