"""`memwise workloads`: list the built-in workloads."""

import click

from memwise.cli.common import emit_json
from memwise.workloads import BUILTIN_WORKLOADS


@click.command("workloads")
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
def workloads_command(output_format: str) -> None:
    """List the built-in workloads and what they run.

    \b
    Example:
      memwise workloads
      memwise profile gpt --arg preset=tiny
    """
    if output_format == "json":
        emit_json([{"name": item.name, "description": item.description} for item in BUILTIN_WORKLOADS.values()])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="built-in workloads")
    table.add_column("name")
    table.add_column("what it runs")
    for item in BUILTIN_WORKLOADS.values():
        table.add_row(item.name, item.description)
    Console().print(table)
