"""`memwise train`: train with OOM recovery, checkpoints and resume."""

import math
import sys
from pathlib import Path

import click

from memwise.cli.common import (
    EXIT_INFEASIBLE,
    EXIT_INTERRUPTED,
    apply_seed,
    build_recipe,
    check_output_directory,
    emit_json,
    format_option,
    handle_errors,
    load_spec,
    seed_option,
    train_recipe_options,
)


@click.command("train")
@click.argument("spec")
@click.option("--steps", type=int, required=True, help="Optimizer steps to reach (with --resume: the total, counting those done).")
@train_recipe_options
@click.option("--budget", default=None, metavar="SIZE", help="Memory budget, e.g. 2GiB: going over it counts as an OOM.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to keep the last two checkpoints (memwise-train-stepNNNNNNNNN.pt); the run locks it.")
@click.option("--checkpoint-every", type=int, default=10, show_default=True, help="Write a checkpoint every K steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --checkpoint-dir (same spec, args, recipe and seed).")
@click.option("--overwrite", is_flag=True, help="Start over in a --checkpoint-dir that holds a checkpoint (deletes it).")
@click.option("--stop-on-nonfinite", is_flag=True, help="Stop (exit 1) at the first NaN/inf loss, keeping the last good checkpoint.")
@seed_option
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--nproc", type=int, default=1, show_default=True, help="Ranks on this machine, launched through torchrun (gloo on CPU, nccl on CUDA).")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default=None, help="DDP or FSDP2 across the ranks (default ddp with --nproc).")
@format_option
@handle_errors
def train_command(spec, steps, args, budget, checkpoint_dir, checkpoint_every, resume, overwrite, stop_on_nonfinite, seed,
                  device, nproc, strategy, output_format, **recipe_options):
    """Train SPEC up to --steps steps; on out-of-memory, halve the micro-batch, double accumulation
    (the effective batch is kept) and redo the same step on the same samples.

    A resumed run trains on the same samples and reaches the same weights as an uninterrupted one.
    Ctrl-C finishes the step, writes a checkpoint (with --checkpoint-dir) and exits 130. Exit 3:
    the budget cannot fit a step even with a micro-batch of 1.

    \b
    Example:
      memwise train gpt --arg preset=tiny --steps 20 --batch-size 16 --budget 4MiB --checkpoint-dir ckpt --seed 0
      memwise train gpt --arg preset=tiny --steps 40 --batch-size 16 --budget 4MiB --checkpoint-dir ckpt --seed 0 --resume
    """
    from memwise.core.errors import BadInputError
    from memwise.core.step import run_device
    from memwise.core.units import format_bytes, parse_size
    from memwise.train.runner import InfeasibleBudgetError, train
    from memwise.workloads import parse_args

    if steps <= 0:
        raise BadInputError(f"--steps: must be a positive integer, got {steps}")
    check_output_directory(checkpoint_dir, "--checkpoint-dir")
    run_device(device)
    recipe = build_recipe(recipe_options)
    budget_bytes = parse_size(budget, name="--budget") if budget is not None else None
    apply_seed(seed)
    if nproc != 1 or strategy is not None:  # memwise.distributed: torchrun, DDP/FSDP2 (docs/distributed.md)
        from memwise.distributed.entry import end_rank_process, summary, train_distributed, under_torchrun

        result = train_distributed(spec, parse_args(args), recipe, steps, nproc=nproc, strategy=strategy or "ddp", device=device,
                                   checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
        if result is not None:
            emit_json(result.to_dict()) if output_format == "json" else click.echo(summary(result))
        if under_torchrun():  # one rank of the user's torchrun: end without teardown (see end_rank_process)
            end_rank_process(0)
        return
    workload = load_spec(spec, args)
    identity = {"spec": spec, "args": parse_args(args)}

    def log(record: dict) -> None:
        event = record["event"]
        if event == "oom":
            click.echo(f"step {record['step']}: out of memory; micro-batch {record['micro_batch_size_before']} -> "
                       f"{record['micro_batch_size_after']}, redoing the step", err=True)
        elif event == "step":
            click.echo(f"step {record['step']}: loss {record['loss']:.4f}, micro-batch {record['micro_batch_size']}, "
                       f"peak {format_bytes(record['peak_bytes'])}", err=True)
        elif event == "nonfinite":
            click.echo(f"memwise: warning: step {record['step']}: the loss is {record['loss']} (not finite)", err=True)
        elif event == "warning":
            click.echo(f"memwise: warning: {record['message']}", err=True)
        elif event == "resumed":
            click.echo(f"resuming from {record['path']} after step {record['steps_done']}", err=True)
        elif event == "target_reached":
            click.echo(f"the checkpoint has {record['steps_done']} steps done, already at --steps {record['steps']} or "
                       "beyond: nothing to train (raise --steps to go on)", err=True)
        elif event == "interrupted":
            where = f", checkpoint in {checkpoint_dir}" if checkpoint_dir is not None else ""
            click.echo(f"interrupted after {record['steps_done']} steps{where}", err=True)

    try:
        result = train(workload, recipe, steps, budget_bytes=budget_bytes, checkpoint_dir=checkpoint_dir,
                       checkpoint_every=checkpoint_every, resume=resume, overwrite=overwrite, seed=seed,
                       stop_on_nonfinite=stop_on_nonfinite, workload_identity=identity, device=device, log=log)
    except InfeasibleBudgetError as error:
        minimum = f" (minimum {error.minimum_bytes} bytes)" if error.minimum_bytes is not None else ""
        click.echo(f"memwise: infeasible: {error}{minimum}", err=True)
        sys.exit(EXIT_INFEASIBLE)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    if output_format == "json":
        emit_json(result.to_dict())
        return
    final = result.loss_history[-1] if result.loss_history else math.nan
    click.echo(f"{result.steps_done} steps, final loss {final:.4f}, peak {format_bytes(result.peak_bytes)}, "
               f"{len(result.oom_events)} OOM recoveries, final micro-batch {result.final_recipe.micro_batch_size}"
               + (f", non-finite loss at steps {list(result.nonfinite_loss_steps)}" if result.nonfinite_loss_steps else ""))
