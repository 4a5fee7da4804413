"""`memwise report`: render a saved profile.json or estimate.json again (table, markdown or HTML)."""

import json
from pathlib import Path

import click

from memwise.cli.common import format_option, handle_errors


@click.command("report")
@click.argument("result_file", type=click.Path(dir_okay=False, path_type=Path))
@format_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write the JSON, timeline.png and report.html here.")
@handle_errors
def report_command(result_file, output_format, out):
    """Show a result saved by `memwise profile --out` or `memwise estimate --out`.

    \b
    Example:
      memwise report memwise-out/profile.json --out memwise-out/again
    """
    from rich.console import Console

    from memwise.core.errors import BadInputError
    from memwise.estimate.estimator import Estimate
    from memwise.measure.profile import Profile
    from memwise.report.output import write_report
    from memwise.report.tables import render_markdown, render_terminal

    try:
        data = json.loads(result_file.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{str(result_file)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise BadInputError(f"{str(result_file)!r} is not JSON ({error})") from None
    kinds = {"measured": (Profile, "profile"), "estimated": (Estimate, "estimate")}
    source = data.get("source") if isinstance(data, dict) else None
    if source not in kinds:
        raise BadInputError(f"{str(result_file)!r} is not a memwise profile or estimate (its 'source' is {source!r})")
    result_type, stem = kinds[source]
    result = result_type.from_dict(data)
    if out is not None:
        written = write_report(result, out, stem=stem)
        click.echo(f"report written to {written['html']}", err=True)
    if output_format == "json":
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif output_format == "markdown":
        click.echo(render_markdown(result))
    else:
        render_terminal(result, Console())
