"""Generation memory: memwise's estimate and the back-of-envelope KV formula against a real generate.

For each architecture and context length, `model.generate` (greedy, exactly N new tokens, random
weights) runs for real under the allocator profiler (measured peak), and on fake tensors (memwise
estimate). The formula users apply by hand is weights + 2 x layers x KV heads x head dim x bytes x
tokens x batch; its error shows what it leaves out (activations, logits, allocator effects).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/deploy/bench_generate.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import print_table, write_rows  # noqa: E402

from memwise.core.units import format_bytes  # noqa: E402
from memwise.estimate.generate import estimate_generation  # noqa: E402
from memwise.measure.generate import GenerationShape, profile_generation  # noqa: E402
from memwise.workloads.hf import hf  # noqa: E402

LLAMA_STYLE = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=688, vocab_size=8000, max_position_embeddings=2048)
ARCHITECTURES = {
    "gpt2": dict(n_layer=4, n_embd=256, n_head=8, vocab_size=8000, n_positions=2048),
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
}
CONTEXT_LENGTHS = (128, 512, 1024)
BATCH_SIZE = 4
NEW_TOKENS = 16


def main() -> None:
    rows, json_rows = [], []
    for model_type, config in ARCHITECTURES.items():
        workload = hf(model_type, **config)
        for context_length in CONTEXT_LENGTHS:
            shape = GenerationShape(batch_size=BATCH_SIZE, context_length=context_length, new_tokens=NEW_TOKENS)
            measured = profile_generation(workload, shape)
            start = time.perf_counter()
            estimated = estimate_generation(workload, shape, what_ifs=False)
            estimate_s = time.perf_counter() - start
            formula = measured.weight_bytes + measured.kv_cache_bytes
            error = estimated.peak_bytes / measured.peak_bytes - 1
            formula_error = formula / measured.peak_bytes - 1
            rows.append([model_type, context_length, format_bytes(measured.peak_bytes), f"{measured.phase_at_peak}",
                         format_bytes(estimated.peak_bytes), f"{error:+.2%}", format_bytes(formula), f"{formula_error:+.1%}",
                         f"{estimate_s:.1f}"])
            json_rows.append({"architecture": model_type, "context_length": context_length, "measured_peak_bytes": measured.peak_bytes,
                              "estimated_peak_bytes": estimated.peak_bytes, "formula_bytes": formula, "error": error,
                              "formula_error": formula_error, "phase_at_peak": measured.phase_at_peak, "estimate_s": estimate_s,
                              "kv_cache_bytes": measured.kv_cache_bytes, "weight_bytes": measured.weight_bytes})
    print_table(f"generate: batch {BATCH_SIZE}, {NEW_TOKENS} new tokens, greedy, fp32, CPU (measured = allocator events of a real model.generate)",
                ["arch", "context", "measured peak", "peak at", "memwise estimate", "error", "weights + KV formula", "formula error",
                 "estimate s"], rows)
    write_rows("deploy_generate", json_rows, {"architectures": ARCHITECTURES, "batch_size": BATCH_SIZE, "new_tokens": NEW_TOKENS})


if __name__ == "__main__":
    main()
