"""`memwise report`: render a saved profile.json or estimate.json again (table, markdown or HTML)."""

import json
from pathlib import Path

import click

from memwise.cli.common import check_output_directory, format_option, handle_errors, show_result


@click.command("report")
@click.argument("result_file", type=click.Path(dir_okay=False, path_type=Path))
@format_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write the JSON, timeline.png and report.html here.")
@click.option("--compare", "compare_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A second saved result (e.g. the estimate of the same step) overlaid on the HTML timeline; needs --out.")
@handle_errors
def report_command(result_file, output_format, out, compare_file):
    """Show a result saved by `memwise profile --out` or `memwise estimate --out`.

    \b
    Example:
      memwise report memwise-out/profile.json --out memwise-out/again
      memwise report prof/profile.json --compare est/estimate.json --out both
    """
    from memwise.core.errors import BadInputError

    check_output_directory(out, "--out")
    if compare_file is not None and out is None:
        raise BadInputError("--compare: the overlay is drawn in report.html; add --out DIR")
    result, stem = _read_result(result_file)
    compare = _read_result(compare_file)[0] if compare_file is not None else None
    show_result(result, output_format, out, stem=stem, compare=compare)


def _read_result(path: Path):
    """The saved profile or estimate in `path`, and the stem its report files use."""
    from memwise.core.errors import BadInputError
    from memwise.estimate.estimator import Estimate
    from memwise.measure.profile import Profile

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise BadInputError(f"{str(path)!r} is not JSON ({error})") from None
    kinds = {"measured": (Profile, "profile"), "estimated": (Estimate, "estimate")}
    source = data.get("source") if isinstance(data, dict) else None
    if source not in kinds:
        raise BadInputError(f"{str(path)!r} is not a memwise profile or estimate (its 'source' is {source!r})")
    result_type, stem = kinds[source]
    return result_type.from_dict(data), stem
