"""Options and error handling shared by the memwise commands."""

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from memwise.core.errors import BadInputError, MemwiseError
from memwise.core.recipe import (
    CheckpointMode,
    Mode,
    OffloadMode,
    OptimizerName,
    OptimizerStateDtype,
    Precision,
    Recipe,
    SdpaBackend,
)
from memwise.workloads import load_workload, parse_args

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_INFEASIBLE = 3

FORMATS = ("table", "json", "markdown")


def _choices(enum_type: Any) -> click.Choice:
    return click.Choice([member.value for member in enum_type])


def recipe_options(function: Callable) -> Callable:
    """The options that describe a step: workload args, batch size, mode, precision, checkpoint, optimizer."""
    options = [
        click.option("--sdpa-backend", type=_choices(SdpaBackend), default=SdpaBackend.AUTO.value, show_default=True, help="Attention kernel to force."),
        click.option("--allocator", default="", metavar="CONF", help="CUDA allocator settings, e.g. expandable_segments:True (ignored on CPU)."),
        click.option("--offload", type=_choices(OffloadMode), default=OffloadMode.NONE.value, show_default=True, help="Keep optimizer state and/or saved activations in host memory."),
        click.option("--optimizer-state", type=_choices(OptimizerStateDtype), default=OptimizerStateDtype.FP32.value, show_default=True, help="Precision of Adam/AdamW moments."),
        click.option("--micro-batch-size", type=int, default=None, help="Samples per forward/backward; gradients accumulate to --batch-size."),
        click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the workload function (repeatable)."),
        click.option("--optimizer", type=_choices(OptimizerName), default=None, help="Optimizer (default: the workload's own, else adamw)."),
        click.option("--checkpoint", type=_choices(CheckpointMode), default=CheckpointMode.NONE.value, show_default=True, help="Activation checkpointing of top-level blocks."),
        click.option("--precision", type=_choices(Precision), default=Precision.FP32.value, show_default=True, help="fp32, bf16 autocast, or fp16 autocast with GradScaler."),
        click.option("--mode", type=_choices(Mode), default=Mode.TRAIN.value, show_default=True, help="train: forward, loss, backward, optimizer; infer: forward only."),
        click.option("--batch-size", type=int, default=None, help="Samples per step (default: the workload's)."),
    ]
    for option in options:
        function = option(function)
    return function


def format_option(function: Callable) -> Callable:
    return click.option(
        "--format", "output_format", type=click.Choice(FORMATS), default="table", show_default=True,
        help="table (terminal), json (one object on stdout, nothing else) or markdown.",
    )(function)


def build_recipe(options: dict[str, Any]) -> Recipe:
    """The Recipe named by the recipe options (the rest of `options` is ignored)."""
    for name in ("batch_size", "micro_batch_size"):
        if options.get(name) is not None and options[name] <= 0:
            raise BadInputError(f"--{name.replace('_', '-')}: must be a positive integer, got {options[name]}")
    fields = ("batch_size", "micro_batch_size", "precision", "checkpoint", "optimizer", "optimizer_state", "offload", "allocator", "sdpa_backend")
    return Recipe(**{name: options[name] for name in fields if name in options})


def load_spec(spec: str, args: tuple[str, ...]):
    return load_workload(spec, parse_args(args))


def handle_errors(function: Callable) -> Callable:
    """Turns memwise errors into one line on stderr and an exit code (2 bad input, 1 other)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except BadInputError as error:
            click.echo(f"memwise: error: {error}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except MemwiseError as error:
            click.echo(f"memwise: error: {error}", err=True)
            sys.exit(EXIT_ERROR)
        except (KeyboardInterrupt, click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as error:  # a failure inside the user's model or torch: one line, not a traceback
            where = _user_frame(error)
            hint = ""
            if isinstance(error, TypeError) and "argument" in str(error):
                hint = "; memwise calls model(batch) for a tensor batch, model(*batch) for a tuple or list, model(**batch) for a dict"
            click.echo(f"memwise: error: {type(error).__name__}: {error}{where}{hint}", err=True)
            sys.exit(EXIT_ERROR)

    return wrapper


def _user_frame(error: BaseException) -> str:
    import traceback

    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if "/memwise/" not in frame.filename and "/torch/" not in frame.filename]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at {frame.filename}:{frame.lineno})"


def stderr_console() -> Console:
    return Console(stderr=True)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def show_result(result: Any, output_format: str, out: Any, *, stem: str) -> None:
    """Writes the report files to `out` (when given), then prints `result` as table, markdown or JSON."""
    from pathlib import Path

    from memwise.report.output import write_report
    from memwise.report.tables import render_markdown, render_terminal

    written = write_report(result, Path(out), stem=stem) if out is not None else {}
    if output_format == "json":
        emit_json(result.to_dict())
    elif output_format == "markdown":
        click.echo(render_markdown(result))
    else:
        render_terminal(result, Console())
    if written:
        click.echo(f"report written to {written['html']}", err=True)


class StepProgress:
    """A progress bar on stderr, shown only once the work has taken more than a second."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.progress: Progress | None = None
        self.task = None
        self.started = None

    def __call__(self, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if self.started is None:
            self.started = now
        if self.progress is None and (now - self.started > 1.0 or done == 0) and done < total:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=stderr_console(), transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=total)
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total)
            if done >= total:
                self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
