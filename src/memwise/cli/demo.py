"""`memwise demo`: the whole tour on the built-in digits-cnn, offline."""

from pathlib import Path

import click

from memwise.cli.common import StepProgress, check_output_directory, handle_errors


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("memwise-out"), show_default=True,
              help="Where report.html and the JSON files go.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@handle_errors
def demo(out: Path, batch_size: int) -> None:
    """Profile the built-in digits-cnn, estimate it, and write an HTML report.

    Needs no network: the data is scikit-learn's digits, shipped inside the package.

    \b
    Example:
      memwise demo --out memwise-out
    """
    from rich.console import Console

    from memwise.core.recipe import Recipe
    from memwise.core.units import format_bytes
    from memwise.estimate.estimator import estimate
    from memwise.measure.profile import profile
    from memwise.report.output import write_report
    from memwise.report.tables import render_terminal
    from memwise.workloads import load_workload

    check_output_directory(out, "--out")
    console = Console()
    workload = load_workload("digits-cnn")
    recipe = Recipe(batch_size=batch_size)
    console.rule(f"memwise demo: {workload.name}, batch {batch_size}, training step")
    progress = StepProgress("profiling")
    try:
        measured = profile(workload, recipe, steps=3, verify=True, progress=progress)
    finally:
        progress.close()
    render_terminal(measured, console)
    predicted = estimate(workload, recipe, "cpu", budget_bytes=measured.peak_bytes)
    error = predicted.peak_bytes / measured.peak_bytes - 1
    console.print(
        f"estimate without running: {format_bytes(predicted.peak_bytes)} "
        f"(measured {format_bytes(measured.peak_bytes)}, error {error:+.2%}, {predicted.elapsed_s:.2f} s)"
    )
    gpu = estimate(workload, recipe.replace(batch_size=batch_size * 64), "T4")
    console.print(
        f"on a T4 at batch {batch_size * 64}: {format_bytes(gpu.total_bytes)} with the CUDA context, "
        f"{'fits' if gpu.fits else 'does not fit'} in {format_bytes(gpu.capacity_bytes)}"
    )
    write_report(measured, out, stem="profile")
    write_report(predicted, out / "estimate", stem="estimate")
    console.print(f"report: {(out / 'report.html').resolve()}")
