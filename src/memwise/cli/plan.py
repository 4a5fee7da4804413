"""`memwise plan` and `memwise find-batch-size`."""

import sys
from pathlib import Path

import click

from memwise.cli.common import (
    EXIT_INFEASIBLE,
    FORMATS,
    emit_json,
    handle_errors,
    load_spec,
    read_recipe_file,
)


def _budget(text: str) -> int:
    """Parses --budget; warns when a bare number (bytes) is larger than any GPU in the catalog."""
    from memwise.core.devices import DEVICES
    from memwise.core.units import format_bytes, parse_size

    budget_bytes = parse_size(text, name="--budget")
    largest = max(DEVICES.values(), key=lambda spec: spec.memory_bytes)
    if text.strip().isdigit() and budget_bytes > largest.memory_bytes:
        click.echo(f"memwise: warning: --budget {text} is read as bytes ({format_bytes(budget_bytes)}), more than the largest "
                   f"device in the catalog ({largest.name}, {format_bytes(largest.memory_bytes)}); add a unit such as MiB or GiB "
                   "if you meant one", err=True)
    return budget_bytes


@click.command("plan")
@click.argument("spec")
@click.option("--budget", required=True, metavar="SIZE", help="Memory budget, e.g. 6GiB or 500MB (a bare number is bytes).")
@click.option("--device", default="cpu", show_default=True, help="cpu, or a GPU from `memwise devices` (planned on the estimate alone without one here).")
@click.option("--effective-batch-size", type=int, default=None, help="Samples per optimizer step, kept by every candidate (default: the workload's).")
@click.option("--objective", type=click.Choice(["throughput", "memory"]), default="throughput", show_default=True,
              help="throughput: the fastest recipe that fits; memory: the smallest peak.")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the workload function (repeatable).")
@click.option("--format", "output_format", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table (terminal), json (one object on stdout, nothing else) or markdown.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the chosen recipe here (a file --recipe accepts) and the frontier plot next to it (<name>-frontier.png).")
@click.option("--force", is_flag=True, help="Replace existing --out files.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Data-parallel ranks: above 1 the budget is per rank and --effective-batch-size the global batch.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp", "auto"]), default="auto", show_default=True,
              help="With --nproc above 1: plan for DDP, FSDP2, or search both (auto).")
@handle_errors
def plan_command(spec, budget, device, effective_batch_size, objective, args, output_format, out, force, nproc, strategy):
    """Find the fastest training recipe of SPEC that fits a memory budget, confirmed by two real steps.

    Searches micro-batching with gradient accumulation, precision, activation checkpointing and
    optimizer-state precision/implementation (plus offload and allocator settings on a GPU) jointly
    on the estimator, ranks them with step times calibrated on this machine, and confirms the
    winner with memwise.profile. Exit code 3 (with the result still printed) when nothing fits.
    With --nproc above 1 the budget is per rank, DDP and FSDP2 are searched on per-rank estimates
    with their communication charged to the step time, and nothing is confirmed by real steps.

    \b
    Example:
      memwise plan gpt --arg preset=small --budget 400MiB --effective-batch-size 16
      memwise plan gpt --budget 6MiB --format json --out plan.json && memwise profile gpt --recipe plan.json
      memwise plan gpt --budget 5MiB --nproc 2 --effective-batch-size 8 --format json
    """
    from memwise.core.errors import BadInputError
    from memwise.plan.planner import plan

    budget_bytes = _budget(budget)
    if effective_batch_size is not None and effective_batch_size <= 0:
        raise BadInputError(f"--effective-batch-size: must be a positive integer, got {effective_batch_size}")
    if nproc <= 0:
        raise BadInputError(f"--nproc: must be a positive integer, got {nproc}")
    if nproc == 1 and strategy != "auto":
        raise BadInputError(f"--strategy: {strategy} needs --nproc above 1 (got --nproc 1)")
    targets = _out_targets(out, force)
    workload = load_spec(spec, args)
    steps = "then 2 real steps" if nproc == 1 else f"per rank of {nproc}, not confirmed"
    click.echo(f"planning {workload.name} for {budget} on {device} (estimates, timed steps, {steps})...", err=True)
    result = plan(workload, budget_bytes, device, effective_batch_size, objective, nproc=nproc, strategy=strategy)
    if targets:
        _write_outputs(result, targets)
    if output_format == "json":
        emit_json(result.to_dict())
    elif output_format == "markdown":
        click.echo(_plan_markdown(result))
    else:
        _print_plan_table(result)
    if targets:
        click.echo(f"recipe written to {targets[0]}, frontier plot to {targets[1]}", err=True)
    if not result.feasible:
        sys.exit(EXIT_INFEASIBLE)


@click.command("find-batch-size")
@click.argument("spec")
@click.option("--budget", required=True, metavar="SIZE", help="Memory budget, e.g. 6GiB or 500MB (a bare number is bytes).")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A JSON recipe (e.g. from `memwise plan --out`); its batch fields are what is searched.")
@click.option("--device", default="cpu", show_default=True, help="cpu, or a GPU from `memwise devices`.")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the workload function (repeatable).")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table (terminal) or json (one object on stdout, nothing else).")
@handle_errors
def find_batch_size_command(spec, budget, recipe_file, device, args, output_format):
    """Find the largest batch of SPEC whose training step fits a budget: bisection on estimates, two real steps.

    Sized for the workload's largest input (its make_largest_batch, else the largest of several
    sampled batches). Exit code 3 when not even a batch of 1 fits.

    \b
    Example:
      memwise find-batch-size gpt --arg preset=small --arg seq_len=64-256 --budget 1GiB --format json
    """
    from memwise.core.units import format_bytes
    from memwise.plan.batch_size import find_batch_size

    budget_bytes = _budget(budget)
    recipe = read_recipe_file(recipe_file) if recipe_file is not None else None
    workload = load_spec(spec, args)
    result = find_batch_size(workload, budget_bytes, recipe, device=device)
    if output_format == "json":
        emit_json(result.to_dict())
    else:
        from rich.console import Console

        console = Console()
        measured = format_bytes(result.measured_peak_bytes) if result.measured_peak_bytes is not None else "not confirmed"
        if result.feasible:
            console.print(f"[bold green]batch size {result.batch_size}[/] fits {format_bytes(result.budget_bytes)} on {result.device}: "
                          f"predicted {format_bytes(result.predicted_peak_bytes)}, measured {measured} "
                          f"({result.trials} real steps, {result.estimates} estimates)")
        else:
            console.print(f"[bold red]infeasible[/]: a batch of 1 needs {format_bytes(result.predicted_peak_bytes)}, "
                          f"more than {format_bytes(result.budget_bytes)} less the margin")
        for note in result.notes:
            console.print(f"  note: {note}")
    if not result.feasible:
        sys.exit(EXIT_INFEASIBLE)


def _out_targets(out: Path | None, force: bool) -> tuple[Path, Path] | None:
    """The recipe file and the plot next to it; refuses existing files without --force, before any work."""
    from memwise.core.errors import BadInputError

    if out is None:
        return None
    plot = out.with_name(f"{out.stem}-frontier.png")
    for path in (out, plot):
        if path.exists() and not force:
            raise BadInputError(f"--out: {str(path)!r} exists; pass --force to replace it or choose another name")
        if path.exists() and not path.is_file():
            raise BadInputError(f"--out: {str(path)!r} exists and is not a regular file")
    if not out.parent.is_dir():
        raise BadInputError(f"--out: directory {str(out.parent)!r} does not exist")
    return out, plot


def _write_outputs(result, targets: tuple[Path, Path]) -> None:
    import json

    from memwise.report.atomic import write_atomic
    from memwise.report.frontier import frontier_png

    png = frontier_png(result)
    write_atomic(targets[0], (json.dumps(result.recipe.to_dict(), indent=2) + "\n").encode("utf-8"))
    write_atomic(targets[1], png)


def _summary_lines(result) -> list[str]:
    from memwise.core.units import format_bytes
    from memwise.plan.planner import recipe_text

    measured = format_bytes(result.measured_peak_bytes) if result.measured_peak_bytes is not None else "not confirmed"
    lines = [
        f"{'feasible' if result.feasible else 'INFEASIBLE'}: {result.workload} on {result.device}, budget {format_bytes(result.budget_bytes)}, "
        f"effective batch {result.effective_batch_size}, objective {result.objective.value}"
        + (f", {result.nproc} ranks with {result.strategy} (budget and peaks per rank)" if result.nproc > 1 else ""),
        f"recipe: {recipe_text(result.recipe)}",
        f"predicted peak {format_bytes(result.predicted_peak_bytes)}, measured {measured} ({result.real_steps} real steps); "
        f"predicted step {result.predicted_step_ms:.1f} ms; {result.estimates} estimates, {result.calibration_steps} timed steps, "
        f"{result.elapsed_s:.1f} s",
    ]
    if result.reason is not None:
        lines.append(f"reason: {result.reason.message}")
    return lines


def _print_plan_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from memwise.core.units import format_bytes

    console = Console()
    for line in _summary_lines(result):
        console.print(line, highlight=False, markup=False)
    table = Table(title="memory/time frontier (predicted)")
    for column in ("", "recipe", "peak", "step ms", "fits"):
        table.add_column(column)
    for alt in result.alternatives:
        table.add_row("▶" if alt.chosen else "", _described(alt), format_bytes(alt.predicted_peak_bytes),
                      f"{alt.predicted_step_ms:.1f}", "yes" if alt.fits else "no", style="bold green" if alt.chosen else None)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False, markup=False)


def _described(alternative) -> str:
    """A frontier row's recipe in words, led by its strategy when several ranks were planned."""
    return f"{alternative.strategy}: {alternative.description}" if alternative.strategy else alternative.description


def _plan_markdown(result) -> str:
    from memwise.core.units import format_bytes

    lines = [f"- {line}" for line in _summary_lines(result)]
    lines += ["", "| | recipe | peak | step ms | fits |", "|---|---|---|---|---|"]
    for alt in result.alternatives:
        mark = "**chosen**" if alt.chosen else ""
        lines.append(f"| {mark} | {_described(alt)} | {format_bytes(alt.predicted_peak_bytes)} | {alt.predicted_step_ms:.1f} | "
                     f"{'yes' if alt.fits else 'no'} |")
    lines += [""] + [f"- note: {note}" for note in result.notes]
    return "\n".join(lines)
