"""`--mode generate` of `memwise estimate` and `memwise profile`: LLM generation memory with its KV cache."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from memwise.cli.common import emit_json
from memwise.cli.key_value import print_key_value_table


def generation_options(function: Callable) -> Callable:
    """--context-length, --new-tokens, --kv-cache-dtype and --cache (used with --mode generate)."""
    options = [
        click.option("--cache", "cache_kind", type=click.Choice(["dynamic", "static"]), default="dynamic", show_default=True,
                     help="--mode generate: the transformers KV cache class."),
        click.option("--kv-cache-dtype", type=click.Choice(["bf16", "fp8", "int8"]), default=None,
                     help="--mode generate: price a quantized KV cache (estimate only)."),
        click.option("--new-tokens", type=int, default=None, help="--mode generate: tokens generated per sequence (default 128)."),
        click.option("--context-length", type=int, default=None, help="--mode generate: prompt tokens per sequence (default: the workload's seq_len)."),
    ]
    for option in options:
        function = option(function)
    return function


def run_generate_mode(workload: Any, *, batch_size: int | None, context_length: int | None, new_tokens: int | None,
                      kv_cache_dtype: str | None, cache_kind: str, budget_bytes: int | None, measure: bool,
                      output_format: str, out: Path | str | None, device: str = "cpu") -> None:
    """Estimates (or with `measure`, profiles) `model.generate` and prints the result."""
    from memwise.core.errors import BadInputError
    from memwise.measure.generate import GenerationShape

    for name, value in (("--batch-size", batch_size), ("--context-length", context_length), ("--new-tokens", new_tokens)):
        if value is not None and value <= 0:
            raise BadInputError(f"{name}: must be a positive integer, got {value}")
    shape = GenerationShape(
        batch_size=batch_size or 1, context_length=context_length or workload.extras.get("seq_len", 128),
        new_tokens=new_tokens or 128, cache=cache_kind,
    )
    if measure:
        if device != "cpu":
            raise BadInputError(f"--device {device}: `memwise profile --mode generate` measures on the CPU; "
                                "use `memwise estimate --mode generate` for other devices")
        if kv_cache_dtype is not None:
            raise BadInputError("--kv-cache-dtype: a what-if of `memwise estimate`; `memwise profile` measures the model's own cache")
        from memwise.measure.generate import profile_generation

        result = profile_generation(workload, shape)
    else:
        from memwise.estimate.generate import estimate_generation

        result = estimate_generation(workload, shape, kv_cache_dtype=kv_cache_dtype or "model", budget_bytes=budget_bytes)
        if device != "cpu":
            import dataclasses

            result = dataclasses.replace(result, notes=(*result.notes, f"--device {device}: generation is estimated with the CPU "
                                                        "allocator's sizes; the CUDA caching allocator's rounding and context are not added"))
    if out is not None:
        import json

        from memwise.report.atomic import write_atomic

        Path(out).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out) / "generate.json", json.dumps(result.to_dict(), indent=2).encode())
    if output_format == "json":
        emit_json(result.to_dict())
        return
    _print(result, markdown=output_format == "markdown")


def _print(result: Any, *, markdown: bool) -> None:
    from memwise.core.units import format_bytes
    from memwise.estimate.generate import describe_budget

    layout = result.layout
    rows = [
        ("peak", f"{format_bytes(result.peak_bytes)} ({result.source}, at {result.phase_at_peak}"
                 + (f" step {result.step_at_peak})" if result.phase_at_peak == "decode" else ")")),
        ("weights", format_bytes(result.weight_bytes)),
        ("KV cache (full)", f"{format_bytes(result.kv_cache_bytes)} = {format_bytes(result.kv_cache_bytes_per_token)}/token "
                            f"(2 x {layout.layers} layers x {layout.kv_heads} KV heads x {layout.head_dim} x "
                            f"{result.kv_cache_bytes_per_token // (2 * layout.layers * layout.kv_heads * layout.head_dim)} B) "
                            f"x {result.batch_size} x {result.context_length + result.new_tokens} tokens"),
        ("prefill logits", format_bytes(result.logits_bytes_prefill)),
        ("cache", f"{result.cache.value}, {result.kv_cache_dtype.value}"),
    ]
    if result.budget_bytes is not None:
        rows.append(("budget", describe_budget(result)))
    rows += [(f"what if: {item.change}", f"{format_bytes(item.peak_bytes)} (saves {format_bytes(item.saving_bytes)})") for item in result.what_ifs]
    rows += [("note", note) for note in result.notes]
    title = f"{result.workload}: generate {result.batch_size} x ({result.context_length} + {result.new_tokens}) tokens"
    print_key_value_table(title, rows, markdown=markdown)
