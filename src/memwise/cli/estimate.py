"""`memwise estimate` and `memwise devices`."""

import click

from memwise.cli.common import (
    build_recipe,
    check_output_directory,
    emit_json,
    format_option,
    handle_errors,
    recipe_options,
    show_result,
)
from memwise.cli.generate import generation_options


@click.command("estimate")
@click.argument("spec")
@recipe_options
@click.option("--device", default="cpu", show_default=True, help="cpu, or a GPU from `memwise devices` (e.g. H100-80GB).")
@click.option("--device-memory", default=None, metavar="SIZE", help="The device's capacity, e.g. 24GiB (for a GPU not in the catalog, or to override).")
@click.option("--budget", default=None, metavar="SIZE", help="A memory budget to check, e.g. 6GiB or 500MB.")
@click.option("--nproc", type=int, default=1, show_default=True, help="Ranks sharing the global --batch-size: the per-rank peak (with --strategy).")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default=None, help="Distributed strategy for --nproc (default ddp).")
@generation_options
@format_option
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Write estimate.json, timeline.png and report.html here.")
@handle_errors
def estimate_command(spec, mode, args, device, device_memory, budget, output_format, out, nproc, strategy,
                     context_length, new_tokens, kv_cache_dtype, cache_kind, **recipe_options):
    """Predict the peak memory of a step of SPEC on a device, without running it there.

    The step runs on fake tensors on this CPU: no weights are allocated. With --budget or a GPU
    device, it says whether the step fits and what would make it fit.

    \b
    Example:
      memwise estimate gpt --arg preset=small --batch-size 16 --device RTX-4090 --precision bf16
      memwise estimate hf:bert --arg num_hidden_layers=4 --budget 2GiB --format json
      memwise estimate hf:llama --arg num_hidden_layers=2 --mode generate --batch-size 4 --context-length 512 --new-tokens 64 --budget 2GiB
    """

    from memwise.core.units import parse_size
    from memwise.estimate.estimator import estimate

    check_output_directory(out, "--out")
    device_memory_bytes = parse_size(device_memory, name="--device-memory") if device_memory is not None else None
    budget_bytes = parse_size(budget, name="--budget") if budget is not None else None
    from memwise.workloads import load_workload, parse_args

    workload = load_workload(spec, parse_args(args), materialize=False)  # parameters on meta: no weight is allocated
    recipe = build_recipe(recipe_options)
    if mode == "generate":  # LLM generation: prefill + decoding with its KV cache (memwise.estimate.generate)
        from memwise.cli.generate import run_generate_mode

        return run_generate_mode(workload, batch_size=recipe.batch_size, context_length=context_length, new_tokens=new_tokens,
                                 kv_cache_dtype=kv_cache_dtype, cache_kind=cache_kind, budget_bytes=budget_bytes, measure=False,
                                 output_format=output_format, out=out, device=device)
    if nproc != 1 or strategy is not None:  # per-rank estimate (memwise.distributed.estimate)
        from memwise.distributed.estimate import estimate_per_rank

        result = estimate_per_rank(workload, recipe, nproc, strategy or "ddp", device, mode=mode, device_memory_bytes=device_memory_bytes, budget_bytes=budget_bytes)
    else:
        result = estimate(workload, recipe, device, mode=mode, device_memory_bytes=device_memory_bytes, budget_bytes=budget_bytes)
    show_result(result, output_format, out, stem="estimate")


@click.command("devices")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
def devices_command(output_format):
    """List the GPUs memwise knows, with their capacity and CUDA context size.

    \b
    Example:
      memwise devices
      memwise estimate gpt --device A100-80GB
    """
    from memwise.core.devices import DEVICES
    from memwise.core.units import format_bytes

    if output_format == "json":
        emit_json([spec.to_dict() for spec in DEVICES.values()])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="devices (use the name with --device)")
    for column in ("name", "memory", "context", "description"):
        table.add_column(column)
    for spec in DEVICES.values():
        table.add_row(spec.name, format_bytes(spec.memory_bytes), format_bytes(spec.context_bytes), spec.description)
    Console().print(table)
