"""`memwise report`: render a saved profile.json or estimate.json again (table, markdown or HTML)."""

import json
from pathlib import Path

import click

from memwise.cli.common import check_output_directory, format_option, handle_errors, show_result


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
    from memwise.core.errors import BadInputError
    from memwise.estimate.estimator import Estimate
    from memwise.measure.profile import Profile

    check_output_directory(out, "--out")
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
    show_result(result_type.from_dict(data), output_format, out, stem=stem)
