"""`memwise train`: train with OOM recovery, checkpoints and resume."""

import json
import sys
from pathlib import Path

import click

from memwise.cli.common import (
    EXIT_INFEASIBLE,
    emit_json,
    format_option,
    handle_errors,
    load_spec,
)


@click.command("train")
@click.argument("spec")
@click.option("--steps", type=int, required=True, help="Optimizer steps to reach.")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A JSON recipe (the fields of memwise.Recipe).")
@click.option("--batch-size", type=int, default=None, help="Effective batch size (overrides the recipe file).")
@click.option("--micro-batch-size", type=int, default=None, help="Micro-batch to start from (overrides the recipe file).")
@click.option("--budget", default=None, metavar="SIZE", help="Memory budget, e.g. 2GiB: going over it counts as an OOM.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where to keep memwise-train.pt.")
@click.option("--checkpoint-every", type=int, default=10, show_default=True, help="Write a checkpoint every K steps.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the workload function (repeatable).")
@format_option
@handle_errors
def train_command(spec, steps, recipe_file, batch_size, micro_batch_size, budget, checkpoint_dir, checkpoint_every, resume, device, args, output_format):
    """Train SPEC for --steps steps; on out-of-memory, halve the micro-batch, double accumulation
    (the effective batch is kept) and redo the same step on the same samples.

    \b
    Example:
      memwise train gpt --arg preset=tiny --steps 20 --batch-size 16 --budget 64MiB --checkpoint-dir ckpt
      memwise train gpt --arg preset=tiny --steps 40 --batch-size 16 --checkpoint-dir ckpt --resume
    """
    from memwise.core.errors import BadInputError
    from memwise.core.units import format_bytes, parse_size
    from memwise.train.runner import InfeasibleBudgetError, train

    recipe = _read_recipe(recipe_file)
    changes = {key: value for key, value in (("batch_size", batch_size), ("micro_batch_size", micro_batch_size)) if value is not None}
    for key, value in changes.items():
        if value <= 0:
            raise BadInputError(f"--{key.replace('_', '-')}: must be a positive integer, got {value}")
    recipe = recipe.replace(**changes)
    budget_bytes = parse_size(budget, name="--budget") if budget is not None else None
    workload = load_spec(spec, args)

    def log(record: dict) -> None:
        if record["event"] == "oom":
            click.echo(f"step {record['step']}: out of memory; micro-batch {record['micro_batch_size_before']} -> "
                       f"{record['micro_batch_size_after']}, redoing the step", err=True)
        else:
            click.echo(f"step {record['step']}: loss {record['loss']:.4f}, micro-batch {record['micro_batch_size']}, "
                       f"peak {format_bytes(record['peak_bytes'])}", err=True)

    try:
        result = train(workload, recipe, steps, budget_bytes=budget_bytes, checkpoint_dir=checkpoint_dir,
                       checkpoint_every=checkpoint_every, resume=resume, device=device, log=log)
    except InfeasibleBudgetError as error:
        click.echo(f"memwise: infeasible: {error} (minimum {error.minimum_bytes} bytes)", err=True)
        sys.exit(EXIT_INFEASIBLE)
    if output_format == "json":
        emit_json(result.to_dict())
        return
    click.echo(f"{result.steps_done} steps, final loss {result.loss_history[-1]:.4f}, peak {format_bytes(result.peak_bytes)}, "
               f"{len(result.oom_events)} OOM recoveries, final micro-batch {result.final_recipe.micro_batch_size}")


def _read_recipe(path: Path | None):
    from memwise.core.errors import BadInputError
    from memwise.core.recipe import Recipe

    if path is None:
        return Recipe()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"--recipe: file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise BadInputError(f"--recipe: {str(path)!r} is not valid JSON ({error})") from None
    return Recipe.from_dict(data)
