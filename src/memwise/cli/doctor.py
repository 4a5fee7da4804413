"""`memwise doctor`: run a workload or a training script under `watch` and print its memory hazards."""

from pathlib import Path

import click

from memwise.cli.common import FORMATS, emit_json, handle_errors, load_spec

EXIT_HAZARDS = 4


@click.command("doctor", context_settings={"ignore_unknown_options": True})
@click.argument("target", metavar="SPEC_OR_SCRIPT")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- SCRIPT_ARGS...]")
@click.option("--steps", type=int, default=6, show_default=True, help="Steps to watch (growth needs at least 4).")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for a workload function (repeatable).")
@click.option("--batch-size", type=int, default=None, help="Samples per step for a workload (default: the workload's).")
@click.option("--mode", type=click.Choice(["train", "infer"]), default="train", show_default=True, help="Workload step kind.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] (workloads).")
@click.option("--format", "output_format", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table (terminal), json (one object on stdout, nothing else) or markdown.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write watch.json, timeline.png and report.html here.")
@handle_errors
def doctor_command(target, script_args, steps, args, batch_size, mode, device, output_format, out):
    """Find memory hazards in SPEC_OR_SCRIPT, each with its source line and fix.

    SPEC_OR_SCRIPT is a built-in workload (mlp, gpt, digits-cnn, ...), file.py:function, or a training
    script (train.py): the script runs as `python train.py SCRIPT_ARGS` would, and the first
    optimizer it makes starts the watch; it is stopped after --steps optimizer steps.

    Hazards: memory growing across steps (a tensor kept with its graph, tensors accumulated in a list,
    a cache that never evicts), zero_grad(set_to_none=False), gradients for parameters the optimizer
    does not hold, retain_graph=True unused, fp32 copies beside bf16 weights, tied weights duplicated,
    evaluation without no_grad, repeated copies of unchanging data, CUDA fragmentation, DataLoader
    workers' memory growth.

    JSON (--format json): {"hazards": [{"kind", "bytes", "steps", "location": {"file", "line"}, "fix",
    "message"}], "steps", "peak_bytes", "target", "script_error"}.

    \b
    Exit status: 0 no hazard, 4 hazards found, 2 bad input (including a script that never steps),
    1 the script failed before its first step (its own error is printed).

    \b
    Example:
      memwise doctor train.py --steps 8 -- --lr 3e-4 --epochs 1
      memwise doctor gpt --arg preset=tiny --format json
    """
    from memwise.core.errors import BadInputError
    from memwise.core.recipe import Recipe
    from memwise.doctor.runner import diagnose_script, diagnose_workload

    if steps <= 0:
        raise BadInputError(f"--steps: must be a positive integer, got {steps}")
    if batch_size is not None and batch_size <= 0:
        raise BadInputError(f"--batch-size: must be a positive integer, got {batch_size}")
    if _is_script(target):
        if args or batch_size is not None:
            raise BadInputError("--arg/--batch-size: apply to workloads only; pass a script's own options after --")
        diagnosis = diagnose_script(target, tuple(script_args), steps=steps)
    else:
        if script_args:
            raise BadInputError(f"SCRIPT_ARGS: {' '.join(script_args)!r} given, but {target!r} is a workload spec, not a script")
        workload = load_spec(target, args)
        diagnosis = diagnose_workload(workload, Recipe(batch_size=batch_size), steps=steps, mode=mode, device=device)
    _show(diagnosis, output_format, out)
    if diagnosis.script_error is not None:
        click.echo(f"memwise: the script failed after {diagnosis.result.steps} watched steps: {diagnosis.script_error}", err=True)
    raise SystemExit(EXIT_HAZARDS if diagnosis.result.hazards else (1 if diagnosis.script_error else 0))


def _is_script(target: str) -> bool:
    return target.endswith(".py") and Path(target).is_file()


def _show(diagnosis, output_format: str, out: Path | None) -> None:
    from memwise.core.units import format_bytes
    from memwise.doctor.hazards import hazards_text
    from memwise.report.output import write_report

    written = write_report(diagnosis.result, out, stem="watch") if out is not None else {}
    if output_format == "json":
        emit_json(diagnosis.to_dict())
    else:
        result = diagnosis.result
        header = f"memwise doctor: {diagnosis.target}: {result.steps} steps watched, peak {format_bytes(result.peak_bytes)}"
        text = hazards_text(result.hazards)
        if output_format == "markdown":
            click.echo(f"# {header}\n\n```\n{text}\n```")
        else:
            click.echo(f"{header}\n{text}")
    if written:
        click.echo(f"report written to {written['html']}", err=True)
