"""A two-column table of (name, value) rows, for results that are a handful of figures."""

import click


def print_key_value_table(title: str, rows: list[tuple[str, str]], *, markdown: bool) -> None:
    """Prints `rows` as a Markdown table (with a `###` title) or a rich table on stdout."""
    if markdown:
        click.echo(f"### {title}\n\n| | |\n|---|---|")
        for name, value in rows:
            click.echo(f"| {name} | {value} |")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    table.add_column("")
    for name, value in rows:
        table.add_row(name, value)
    Console(emoji=False).print(table)  # emoji=False: "hf:llama:" is not an emoji code
