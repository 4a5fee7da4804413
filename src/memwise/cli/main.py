"""The `memwise` command group.

Subcommands are imported when they run, not when `memwise` starts: `memwise --help` lists them
from their modules' source (the command function's docstring) without importing torch.
"""

import ast
import importlib
import importlib.util
import textwrap
from typing import Any

import click

# command name -> "module:attribute" of its click command (a new command is one line here)
COMMANDS = {
    "profile": "memwise.cli.profile:profile_command",
    "workloads": "memwise.cli.workloads:workloads_command",
    "estimate": "memwise.cli.estimate:estimate_command",
    "devices": "memwise.cli.estimate:devices_command",
    "train": "memwise.cli.train:train_command",
    "report": "memwise.cli.report:report_command",
    "demo": "memwise.cli.demo:demo",
    "doctor": "memwise.cli.doctor:doctor_command",
    "tune-loader": "memwise.cli.tune_loader:tune_loader_command",
    "export": "memwise.cli.export:export_command",
    "run": "memwise.cli.run:run_command",
    "compress": "memwise.cli.compress:compress_command",
    "plan": "memwise.cli.plan:plan_command", "find-batch-size": "memwise.cli.plan:find_batch_size_command",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand is used."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.lazy_commands) | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands and name not in self.commands:
            module_name, attribute = self.lazy_commands[name].split(":")
            self.add_command(example_last(getattr(importlib.import_module(module_name), attribute)), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max((len(name) for name in names), default=0)
        for name in names:
            summary = None if name in self.commands else _docstring_summary(self.lazy_commands.get(name, ""))
            if summary is None:
                command = self.get_command(ctx, name)
                if command is None or command.hidden:
                    continue
                rows.append((name, command.get_short_help_str(limit)))
            else:
                rows.append((name, _shorten(summary, limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _docstring_summary(target: str) -> str | None:
    """The first paragraph of the command function's docstring, read from source without importing it."""
    module_name, _, attribute = target.partition(":")
    try:
        spec = importlib.util.find_spec(module_name)
        source = open(spec.origin, encoding="utf-8").read() if spec and spec.origin else None
    except (ImportError, OSError, ValueError):
        return None
    if source is None:
        return None
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == attribute:
            docstring = ast.get_docstring(node) or ""
            return " ".join(docstring.split("\n\n")[0].split()) or None
    return None


def example_last(command: click.Command) -> click.Command:
    """Moves the worked example of a command's docstring after its options, so `--help` ends with it."""
    help_text = command.help or ""
    start = help_text.find("Example")
    if start == -1 or command.epilog:
        return command
    before = help_text[:start].rstrip()
    if before.endswith("\b"):  # click's no-rewrap marker belongs to the example block
        before = before[:-2].rstrip()
    first, _, rest = help_text[start:].partition("\n")
    command.help = before
    command.epilog = "\b\n" + first.strip() + "\n" + textwrap.indent(textwrap.dedent(rest).strip("\n"), "  ")
    return command


def _shorten(text: str, limit: int) -> str:
    # click's rule for a command's short help: the first sentence if it fits, else cut at a word
    if text.find(". ") != -1:
        text = text[: text.find(". ") + 1]
    if len(text) <= limit:
        return text
    return text[: text.rfind(" ", 0, limit - 3)] + "..."


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta["memwise.debug"] = True  # read by memwise.cli.common.handle_errors (every command also takes --debug)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memwise")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
              help="Print the full traceback behind an error.")
def main() -> None:
    """memwise: make PyTorch training and inference fit the memory you have.

    \b
    Example:
      memwise profile digits-cnn --batch-size 64 --verify
    """


example_last(main)


if __name__ == "__main__":
    main()
