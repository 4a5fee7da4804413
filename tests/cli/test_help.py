"""Every `--help` ends with a worked example (STYLE.md), after the options."""

import pytest
from click.testing import CliRunner

from memwise.cli.main import COMMANDS, main


@pytest.mark.parametrize("command", [None, *sorted(COMMANDS)])
def test_help_ends_with_a_worked_example(command):
    args = ["--help"] if command is None else [command, "--help"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.rstrip().splitlines()]
    example_at = max(index for index, line in enumerate(lines) if line.strip() == "Example:")
    options_at = max((index for index, line in enumerate(lines) if line.strip() in ("Options:", "Commands:")), default=-1)
    assert example_at > options_at
    assert lines[example_at + 1].strip().startswith("memwise ")
