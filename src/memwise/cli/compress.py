"""`memwise compress`: the smallest (or fastest) model whose metric drops at most --max-metric-drop."""

import sys
from pathlib import Path

import click

from memwise.cli.common import EXIT_INFEASIBLE, StepProgress, emit_json, format_option, handle_errors, load_spec


@click.command("compress")
@click.argument("spec")
@click.option("--max-metric-drop", type=float, required=True, help="Largest allowed drop of the workload's metric, in [0, 1] (0.01 = one accuracy point).")
@click.option("--objective", type=click.Choice(["size", "latency"]), default="size", show_default=True, help="Minimize the saved file's size or the batch-32 CPU latency.")
@click.option("--methods", default="prune,quantize,distill,sparse", show_default=True, help="Comma-separated methods to search.")
@click.option("--budget-s", type=float, default=None, help="Seconds after which no new search step starts (default 540).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for model.pt, report.json and report.html.")
@click.option("--force", is_flag=True, help="Replace model.pt and the reports in an existing --out directory.")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="A state dict of your trained model to load into the workload's model.")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the workload function (repeatable).")
@format_option
@handle_errors
def compress_command(spec, max_metric_drop, objective, methods, budget_s, out, force, weights, args, output_format):
    """Search pruning, quantization, distillation and sparse storage of SPEC's trained model and keep
    the best candidate whose metric drops at most --max-metric-drop.

    Every trial is evaluated on held-out data and timed side by side with the original. The result
    is saved to DIR/model.pt (load it with memwise.load_compressed(DIR)). Exit 3: no candidate meets
    the guard (the best found is reported, nothing is saved).

    \b
    Example:
      memwise compress digits-cnn --max-metric-drop 0.01 --out compressed/
      memwise compress minilm --max-metric-drop 0.01 --objective latency --out minilm-int8/
    """
    from memwise.compress import compress
    from memwise.compress.search import check_arguments

    check_arguments(max_metric_drop, out, force)  # before the workload loads
    workload = load_spec(spec, args)
    bar = StepProgress(f"compress {spec}")
    try:
        result = compress(
            workload, max_metric_drop, objective=objective, methods=methods, budget_s=budget_s, out=out, force=force,
            weights=weights, progress=lambda done, total, label: bar(done, total),
        )
    finally:
        bar.close()
    for item in result.skipped:
        click.echo(f"memwise: skipped {item.method}: {item.reason}", err=True)
    if output_format == "json":
        emit_json(result.to_dict())
    else:
        click.echo(render_markdown(result) if output_format == "markdown" else render_text(result))
    if not result.feasible:
        click.echo(f"memwise: no candidate keeps the metric drop within {max_metric_drop}; best found drops {result.metric_drop:+.4f} with {' + '.join(item.name for item in result.methods)} (nothing saved)", err=True)
        sys.exit(EXIT_INFEASIBLE)
    click.echo(f"model written to {result.path}", err=True)


def _trial_rows(result) -> list[list[str]]:
    rows = []
    for trial in result.trials:
        ratio = trial.latency_ms["batch_32"] / trial.original_latency_ms["batch_32"]
        rows.append([
            trial.method, str(trial.size_bytes), f"{trial.size_bytes / result.original.size_bytes:.3f}x", f"{trial.metric:.4f}",
            f"{trial.metric_drop:+.4f}", f"{trial.latency_ms['batch_1']:.2f}", f"{trial.latency_ms['batch_32']:.1f}", f"{ratio:.2f}x",
            "yes" if trial.accepted else "no", ", ".join(trial.flags),
        ])
    return rows


_COLUMNS = ["method", "size_bytes", "size ratio", "metric", "drop", "batch 1 ms", "batch 32 ms", "latency ratio", "accepted", "flags"]


def _headline(result) -> str:
    original, compressed = result.original, result.compressed
    return (
        f"{result.workload}: {original.size_bytes} -> {compressed.size_bytes} bytes ({result.size_ratio:.3f}x, "
        f"{1 / result.size_ratio:.1f}x smaller), metric {original.metric:.4f} -> {compressed.metric:.4f} "
        f"(drop {result.metric_drop:+.4f}, max {result.max_metric_drop}), batch-32 latency "
        f"{original.latency_ms['batch_32']:.1f} -> {compressed.latency_ms['batch_32']:.1f} ms ({result.latency_ratio:.2f}x); "
        f"methods: {' + '.join(item.name for item in result.methods)}; search {result.search_s:.0f} s"
    )


def render_markdown(result) -> str:
    lines = [_headline(result), "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _trial_rows(result)]
    return "\n".join(lines)


def render_text(result) -> str:
    rows = [_COLUMNS] + _trial_rows(result)
    widths = [max(len(row[index]) for row in rows) for index in range(len(_COLUMNS))]
    lines = [_headline(result), ""]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
