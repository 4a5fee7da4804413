"""`memwise tune-loader`: measure DataLoader settings on a workload's dataset and recommend the fastest."""

import click

from memwise.cli.common import emit_json, format_option, handle_errors, load_spec


@click.command("tune-loader")
@click.argument("spec")
@click.option("--batch-size", type=int, default=None, help="Samples per batch (default: the workload's).")
@click.option("--host-budget", default=None, metavar="SIZE", help="Most host memory (PSS of main process + workers), e.g. 4GiB.")
@click.option("--max-batches", type=int, default=12, show_default=True, help="Batches per epoch measured for each candidate.")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the workload function (repeatable).")
@format_option
@handle_errors
def tune_loader_command(spec, batch_size, host_budget, max_batches, args, output_format):
    """Measure samples/s and host memory (PSS of the process tree) of DataLoader configurations
    (num_workers, prefetch_factor, persistent_workers, pin_memory on CUDA) over SPEC's dataset,
    and recommend the fastest within --host-budget.

    A user workload exposes its dataset with Workload(..., extras={"dataset": dataset}).

    \b
    Example:
      memwise tune-loader digits-cnn --batch-size 64 --host-budget 2GiB
    """
    from rich.console import Console
    from rich.table import Table

    from memwise.cli.common import StepProgress
    from memwise.core.errors import BadInputError
    from memwise.core.units import format_bytes, parse_size
    from memwise.data import dataset_of, tune_loader

    if batch_size is not None and batch_size <= 0:
        raise BadInputError(f"--batch-size: must be a positive integer, got {batch_size}")
    if max_batches <= 0:
        raise BadInputError(f"--max-batches: must be a positive integer, got {max_batches}")
    budget = parse_size(host_budget, name="--host-budget") if host_budget is not None else None
    workload = load_spec(spec, args)
    progress = StepProgress("measuring loader configurations")
    try:
        config = tune_loader(dataset_of(workload), batch_size or workload.default_batch_size, budget,
                             max_batches=max_batches, progress=progress)
    finally:
        progress.close()
    if output_format == "json":
        emit_json(config.to_dict())
        return
    columns = ["num_workers", "prefetch", "persistent", "pin_memory", "samples/s", "peak host (PSS)", "fits", ""]
    rows = []
    for candidate in config.candidates:
        chosen = all(getattr(candidate, name) == getattr(config, name)
                     for name in ("num_workers", "prefetch_factor", "persistent_workers", "pin_memory"))
        rows.append([str(candidate.num_workers), str(candidate.prefetch_factor or "-"), str(candidate.persistent_workers),
                     str(candidate.pin_memory), f"{candidate.samples_per_s:,.0f}", format_bytes(candidate.peak_host_bytes),
                     "yes" if candidate.fits else "no", "<- recommended" if chosen else ""])
    verdict = (f"{config.reason}: DataLoader(dataset, **{config.dataloader_kwargs()}) at {config.samples_per_s:,.0f} samples/s, "
               f"{config.samples_per_s / config.baseline_samples_per_s:.2f}x the default loader")
    if output_format == "markdown":
        click.echo("| " + " | ".join(columns) + " |")
        click.echo("|" + "|".join("---" for _ in columns) + "|")
        for row in rows:
            click.echo("| " + " | ".join(row) + " |")
        click.echo(f"\n{verdict}")
        return
    table = Table(title=f"DataLoader candidates for {workload.name} (batch {config.batch_size})")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(verdict)
