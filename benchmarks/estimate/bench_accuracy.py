"""memwise.estimate against memwise.profile and the plain profiler reference, over the issue's grid.

Grid: workloads {digits-cnn, mlp, gpt tiny, gpt small, hf:bert 2 layers, hf:gpt2 2 layers}
x batch {1, 8, 32} x precision {fp32, bf16} x checkpoint {none, full} x optimizer {sgd, adamw}
in train mode, and x batch x precision in infer mode. Prints every case and a summary.

Run: python benchmarks/estimate/bench_accuracy.py [--quick]
"""

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import memwise  # noqa: E402
from common import print_table, write_rows  # noqa: E402

WORKLOADS = [
    ("digits-cnn", {}),
    ("mlp", {}),
    ("gpt", {"preset": "tiny"}),
    ("gpt", {"preset": "small", "seq_len": 128}),
    ("hf:bert", {"num_hidden_layers": 2, "seq_len": 64}),
    ("hf:gpt2", {"n_layer": 2, "seq_len": 64}),
]


def cases(quick: bool):
    batches = (1, 8) if quick else (1, 8, 32)
    for (spec, args), batch_size, precision in itertools.product(WORKLOADS, batches, ("fp32", "bf16")):
        for checkpoint, optimizer in itertools.product(("none", "full"), ("sgd", "adamw")):
            yield spec, args, batch_size, precision, checkpoint, optimizer, "train"
        yield spec, args, batch_size, precision, "none", None, "infer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8 only")
    options = parser.parse_args()
    rows = []
    workloads = {}
    for spec, args, batch_size, precision, checkpoint, optimizer, mode in cases(options.quick):
        key = (spec, tuple(sorted(args.items())))
        workload = workloads.get(key) or workloads.setdefault(key, memwise.load_workload(spec, args))
        recipe = memwise.Recipe(batch_size=batch_size, precision=precision, checkpoint=checkpoint, optimizer=optimizer)
        measured = memwise.profile(workload, recipe, mode=mode, steps=2, verify=True)
        started = time.perf_counter()
        predicted = memwise.estimate(workload, recipe, "cpu", mode=mode, what_if=False)
        estimate_s = time.perf_counter() - started
        rows.append({
            "workload": spec + "".join(f" {k}={v}" for k, v in args.items()), "mode": mode, "batch_size": batch_size,
            "precision": precision, "checkpoint": checkpoint, "optimizer": optimizer or "-",
            "estimate_bytes": predicted.peak_bytes, "measured_bytes": measured.peak_bytes,
            "reference_bytes": measured.reference_peak_bytes,
            "error": predicted.peak_bytes / measured.peak_bytes - 1,
            "error_vs_reference": predicted.peak_bytes / measured.reference_peak_bytes - 1,
            "in_range": predicted.low_bytes <= measured.peak_bytes <= predicted.high_bytes,
            "estimate_s": estimate_s,
        })
        row = rows[-1]
        print(f"{row['workload']:<36} {mode:<5} b{batch_size:<3} {precision} ckpt={checkpoint:<4} opt={row['optimizer']:<5} "
              f"est {row['estimate_bytes']:>13,} meas {row['measured_bytes']:>13,} err {row['error']:+.4f} {estimate_s:.2f}s", file=sys.stderr)
    print_table("estimate vs measured on CPU", ["workload", "mode", "batch", "precision", "checkpoint", "optimizer", "estimate", "measured", "reference", "error", "in [low, high]", "estimate s"],
                [[r["workload"], r["mode"], r["batch_size"], r["precision"], r["checkpoint"], r["optimizer"], f"{r['estimate_bytes']:,}",
                  f"{r['measured_bytes']:,}", f"{r['reference_bytes']:,}", f"{r['error']:+.4f}", "yes" if r["in_range"] else "NO", f"{r['estimate_s']:.2f}"] for r in rows])
    errors = [abs(r["error"]) for r in rows]
    summary = {"cases": len(rows), "max_abs_error": max(errors), "median_abs_error": statistics.median(errors),
               "within_5pct": sum(e <= 0.05 for e in errors), "in_range": sum(r["in_range"] for r in rows),
               "median_estimate_s": statistics.median(r["estimate_s"] for r in rows)}
    print_table("summary", list(summary), [[f"{v:.4f}" if isinstance(v, float) else v for v in summary.values()]])
    path = write_rows("bench_accuracy", rows + [{"summary": summary}], {"quick": options.quick, "steps": 2})
    print(f"\nJSON lines appended to {path}")


if __name__ == "__main__":
    main()
