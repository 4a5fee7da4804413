"""`memwise run`: inference in a memory budget, streaming weights that do not fit."""

import click

from memwise.cli.common import emit_json, format_option, handle_errors, load_spec
from memwise.cli.key_value import print_key_value_table


@click.command("run")
@click.argument("spec")
@click.option("--budget", required=True, metavar="SIZE", help="Most weight bytes resident in compute memory, e.g. 2GiB or 500MB.")
@click.option("--offload", "where", type=click.Choice(["cpu", "disk"]), default=None,
              help="Where the other weights wait: disk (memory-mapped safetensors; default on CPU) or cpu (pinned host memory, for CUDA).")
@click.option("--batch-size", type=int, default=None, help="Samples in the batch (default: the workload's).")
@click.option("--device", default=None, help="Compute device: cuda[:N] or cpu (default: CUDA when available).")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the workload function (repeatable).")
@format_option
@handle_errors
def run_command(spec, budget, where, batch_size, device, args, output_format):
    """Run inference of SPEC with at most --budget of weights resident, and compare with the plain model.

    Blocks (transformer layers) that do not fit are streamed in one at a time. The table shows the
    measured peak, the most weight bytes resident, latency against the plain model, and the
    largest difference of the outputs.

    \b
    Example:
      memwise run hf:gpt2 --arg n_layer=6 --budget 200MB --batch-size 2
      memwise run minilm --budget 40MB --format json
    """
    from memwise.core.errors import BadInputError
    from memwise.core.units import format_bytes, parse_size
    from memwise.export.run import run_in_budget

    budget_bytes = parse_size(budget, name="--budget")
    if batch_size is not None and batch_size <= 0:
        raise BadInputError(f"--batch-size: must be a positive integer, got {batch_size}")
    _check_offload(where, device)
    result = run_in_budget(load_spec(spec, args), budget_bytes, where=where, batch_size=batch_size, device=device)
    if output_format == "json":
        emit_json(result.to_dict())
        return
    rows = [
        ("budget / all weights", f"{format_bytes(result.budget_bytes)} / {format_bytes(result.weight_bytes)}"),
        ("resident weights (max)", format_bytes(result.resident_weight_bytes_max)),
        ("peak (measured)", format_bytes(result.peak_bytes)),
        ("latency offloaded / plain", f"{result.latency_ms:.1f} ms / {result.plain_latency_ms:.1f} ms "
                                      f"({result.latency_ms / result.plain_latency_ms:.2f}x)" if result.plain_latency_ms
                                      else f"{result.latency_ms:.1f} ms / plain model does not fit"),
        ("max abs diff vs plain", f"{result.max_abs_diff:.3g}" if result.max_abs_diff is not None else "n/a (plain model does not fit)"),
        ("offload to", f"{result.where} ({len(result.pinned_units)} units kept resident)"),
    ]
    print_key_value_table(f"{result.workload}, batch {result.batch_size}, in {format_bytes(result.budget_bytes)}", rows,
                          markdown=output_format == "markdown")


def _check_offload(where, device) -> None:
    """Refuses --offload cpu for CPU compute here, so the message names the CLI options."""
    import torch

    from memwise.core.errors import BadInputError

    try:
        compute = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise BadInputError(f"--device: cannot read {device!r}; use cpu or cuda[:N]") from None
    if where == "cpu" and compute.type == "cpu":
        raise BadInputError(
            "--offload cpu: keeps the offloaded weights in host memory, which is the compute memory of a CPU run "
            f"(compute device: {compute}); use --offload disk (the default on CPU), or --device cuda on a machine with CUDA"
        )
