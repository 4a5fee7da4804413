"""Start-up: `import memwise` and `memwise --help` load no more than they need."""

import importlib
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import memwise
from memwise.cli.main import COMMANDS, main

MEMWISE = Path(sys.executable).with_name("memwise")


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout


def test_import_memwise_and_help_do_not_import_torch():
    out = _run(
        "import sys, memwise; from memwise.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules, 'rich' in sys.modules)"
    )
    assert out.strip().splitlines()[-1] == "TORCH False False"


@pytest.mark.integration
def test_help_is_fast():
    # The target is 0.5 s on an idle machine (docs/benchmarks.md has the figure); the bound here
    # leaves room for a busy CI machine while still failing if torch is imported (2+ s).
    if not MEMWISE.exists():
        pytest.skip(f"the memwise console script is not installed next to {sys.executable}")
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([str(MEMWISE), "--help"], capture_output=True, check=True, timeout=60)
        times.append(time.perf_counter() - started)
    assert min(times) < 1.5, times


def test_lazy_help_lists_what_click_would_list_with_every_command_imported():
    lazy = CliRunner().invoke(main, ["--help"])
    eager = click.Group("main", help=main.help, epilog=main.epilog, params=main.params, context_settings=main.context_settings)
    for name, target in COMMANDS.items():
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        assert command.name == name
        eager.add_command(command)
    assert lazy.exit_code == 0
    assert lazy.output == CliRunner().invoke(eager, ["--help"]).output


def test_a_subcommand_runs_and_a_typo_is_refused():
    result = CliRunner().invoke(main, ["devices", "--format", "json"])
    assert result.exit_code == 0 and '"name"' in result.output
    result = CliRunner().invoke(main, ["estimat"])
    assert result.exit_code == 2 and "No such command 'estimat'" in result.output


def test_public_names_are_the_functions_even_after_their_subpackages_are_imported():
    import memwise.estimate.estimator  # noqa: F401  (sets memwise.estimate on the package)
    import memwise.train.runner  # noqa: F401

    assert callable(memwise.estimate) and memwise.estimate.__name__ == "estimate"
    assert callable(memwise.train) and memwise.train.__name__ == "train"
    assert set(memwise.__all__) <= set(dir(memwise))
    for name in memwise.__all__:
        assert getattr(memwise, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        memwise.not_a_name  # noqa: B018
