"""Options and error handling shared by the memwise commands."""

import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
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
    OPTIMIZER_DESCRIPTIONS,
    CheckpointMode,
    Mode,
    OffloadMode,
    OptimizerImpl,
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
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C

FORMATS = ("table", "json", "markdown")


def _choices(enum_type: Any) -> click.Choice:
    return click.Choice([member.value for member in enum_type])


def _optimizer_help() -> str:
    described = "; ".join(f"{name.value} = {OPTIMIZER_DESCRIPTIONS[name]}" for name in OptimizerName)
    return f"Optimizer: {described} (default: the workload's own, else adamw)."


def _recipe_option_list(*, with_mode: bool) -> list[Callable]:
    """Every Recipe field as an option, defined once for profile, estimate and train.

    Each defaults to None (unset) so that only the options given override the --recipe file; the
    help states the Recipe default used when neither sets a field.
    """
    options = [
        click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="A JSON recipe (the fields of memwise.Recipe); the options below override its fields."),
        click.option("--batch-size", type=int, default=None, help="Samples per optimizer step (default: the workload's)."),
        click.option("--micro-batch-size", type=int, default=None, help="Samples per forward/backward; gradients accumulate to --batch-size."),
        click.option("--precision", type=_choices(Precision), default=None, help="fp32 (default), bf16 autocast, fp16 autocast with GradScaler, or bf16-weights with fp32 masters."),
        click.option("--checkpoint", type=_choices(CheckpointMode), default=None, help="Activation checkpointing of top-level blocks (default: none)."),
        click.option("--checkpoint-every-n", type=int, default=None, help="For --checkpoint every_n: checkpoint every N-th block (default: 2)."),
        click.option("--checkpoint-modules", default=None, metavar="NAMES",
                     help="For --checkpoint selective: comma-separated block class or qualified names (default: every block)."),
        click.option("--optimizer", type=_choices(OptimizerName), default=None, help=_optimizer_help()),
        click.option("--optimizer-state", type=_choices(OptimizerStateDtype), default=None, help="Precision of Adam/AdamW moments (default: fp32)."),
        click.option("--optimizer-impl", type=_choices(OptimizerImpl), default=None,
                     help="Optimizer kernels: foreach (multi-tensor), fused, or for-loop (default: torch's choice)."),
        click.option("--offload", type=_choices(OffloadMode), default=None, help="Keep optimizer state and/or saved activations in host memory (default: none)."),
        click.option("--allocator", default=None, metavar="CONF", help="CUDA allocator settings, e.g. expandable_segments:True (ignored on CPU)."),
        click.option("--sdpa-backend", type=_choices(SdpaBackend), default=None, help="Attention kernel to force (default: auto)."),
        click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the workload function (repeatable)."),
    ]
    if with_mode:
        options.append(click.option("--mode", type=_choices(Mode), default=Mode.TRAIN.value, show_default=True,
                                    help="train: forward, loss, backward, optimizer; infer: forward only."))
    return options


def _decorate(function: Callable, options: list[Callable]) -> Callable:
    for option in reversed(options):  # the first option is listed first in --help
        function = option(function)
    return function


def recipe_options(function: Callable) -> Callable:
    """The options that describe a step (every Recipe field, --recipe FILE, --arg, --mode)."""
    return _decorate(function, _recipe_option_list(with_mode=True))


def train_recipe_options(function: Callable) -> Callable:
    """`recipe_options` without --mode (a training run always trains)."""
    return _decorate(function, _recipe_option_list(with_mode=False))


def seed_option(function: Callable) -> Callable:
    return click.option(
        "--seed", type=int, default=None,
        help="Seed torch, numpy and Python's random before the model is built and before the steps (dropout runs repeat).",
    )(function)


def format_option(function: Callable) -> Callable:
    return click.option(
        "--format", "output_format", type=click.Choice(FORMATS), default="table", show_default=True,
        help="table (terminal), json (one object on stdout, nothing else) or markdown.",
    )(function)


_RECIPE_FIELDS = tuple(field.name for field in dataclasses.fields(Recipe))


def build_recipe(options: dict[str, Any]) -> Recipe:
    """The Recipe of the --recipe file (if any) with the recipe options that were given applied over it.

    The rest of `options` is ignored.
    """
    recipe = read_recipe_file(options.get("recipe_file"))
    changes = {name: options[name] for name in _RECIPE_FIELDS if options.get(name) is not None}
    for name in ("batch_size", "micro_batch_size", "checkpoint_every_n"):
        if name in changes and changes[name] <= 0:
            raise BadInputError(f"--{name.replace('_', '-')}: must be a positive integer, got {changes[name]}")
    if "checkpoint_modules" in changes:
        changes["checkpoint_modules"] = tuple(name.strip() for name in changes["checkpoint_modules"].split(",") if name.strip())
    return recipe.replace(**changes)


def read_recipe_file(path: Path | None) -> Recipe:
    """The Recipe in JSON file `path` (defaults when None); errors name --recipe and the file."""
    if path is None:
        return Recipe()
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInputError(f"--recipe: file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"--recipe: cannot read {str(path)!r} ({error})") from None
    except json.JSONDecodeError as error:
        raise BadInputError(f"--recipe: {str(path)!r} is not valid JSON ({error})") from None
    return Recipe.from_dict(data)


def apply_seed(seed: int | None) -> None:
    """Seeds every generator (see `memwise.core.rng.seed_all`) when --seed was given."""
    if seed is not None:
        from memwise.core.rng import seed_all

        seed_all(seed)


def check_output_directory(path: Any, option: str) -> None:
    """Fails at once, before any work, when --out / --checkpoint-dir cannot be written."""
    if path is not None:
        from memwise.report.atomic import check_writable_directory

        check_writable_directory(path, option)


def load_spec(spec: str, args: tuple[str, ...]):
    return load_workload(spec, parse_args(args))


_DEBUG_KEY = "memwise.debug"  # also set by `memwise --debug` (cli/main.py)


def _set_debug(context: click.Context, parameter: click.Parameter, value: bool) -> None:
    if value:
        context.meta[_DEBUG_KEY] = True


def debug_option(function: Callable) -> Callable:
    """`--debug`: print the traceback behind an error (also accepted as `memwise --debug COMMAND`)."""
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Print the full traceback behind an error.")(function)


def handle_errors(function: Callable) -> Callable:
    """Turns errors into one line on stderr and an exit code (2 bad input, 1 other, 130 Ctrl-C); adds --debug."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except KeyboardInterrupt:
            _print_traceback_if_debug()
            click.echo("memwise: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BadInputError as error:
            _print_traceback_if_debug()
            click.echo(f"memwise: error: {error}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except MemwiseError as error:
            _print_traceback_if_debug()
            click.echo(f"memwise: error: {error}", err=True)
            sys.exit(EXIT_ERROR)
        except Exception as error:  # a failure inside the user's model or torch: one line, not a traceback
            _print_traceback_if_debug()
            hint = ""
            if isinstance(error, TypeError) and _raised_calling_the_model(error):
                hint = "; memwise calls model(batch) for a tensor batch, model(*batch) for a tuple or list, model(**batch) for a dict"
            debug = "" if _debug() else " (--debug shows the traceback)"
            click.echo(f"memwise: error: {type(error).__name__}: {error}{_user_frame(error)}{hint}{debug}", err=True)
            sys.exit(EXIT_ERROR)

    return debug_option(wrapper)


def _debug() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context is not None and context.meta.get(_DEBUG_KEY))


def _print_traceback_if_debug() -> None:
    if _debug():
        import traceback

        click.echo(traceback.format_exc().rstrip(), err=True)


def _raised_calling_the_model(error: BaseException) -> bool:
    """True when the TypeError was raised by the call `model(batch)` itself (its arguments do not fit
    `forward`), not inside forward: after memwise's `call_model` frame, the traceback goes only through
    torch's `Module.__call__` machinery and memwise's own wrappers, never into the user's code."""
    import traceback

    import memwise.core.workload

    package = Path(memwise.core.workload.__file__).parent.parent
    frames = traceback.extract_tb(error.__traceback__)
    calls = [index for index, frame in enumerate(frames) if frame.name == "call_model" and frame.filename == memwise.core.workload.__file__]
    if not calls:
        return False
    return all(Path(frame.filename).as_posix().endswith("torch/nn/modules/module.py") or Path(frame.filename).is_relative_to(package)
               for frame in frames[calls[-1] + 1:])


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


def show_result(result: Any, output_format: str, out: Any, *, stem: str, compare: Any = None) -> None:
    """Writes the report files to `out` (when given), then prints `result` as table, markdown or JSON.

    `compare` is a second result overlaid on the HTML timeline (e.g. the estimate of a measured run).
    """
    from memwise.report.output import write_report
    from memwise.report.tables import render_markdown, render_terminal

    written = write_report(result, Path(out), stem=stem, compare=compare) if out is not None else {}
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
