"""`memwise profile`: measure where memory goes in real steps."""

from pathlib import Path

import click

from memwise.cli.common import (
    StepProgress,
    apply_seed,
    build_recipe,
    check_output_directory,
    format_option,
    handle_errors,
    load_spec,
    recipe_options,
    seed_option,
    show_result,
)
from memwise.cli.generate import generation_options


@click.command("profile")
@click.argument("spec")
@recipe_options
@click.option("--steps", type=int, default=3, show_default=True, help="Steps to measure.")
@click.option("--verify", is_flag=True, help="Also run a plain torch.profiler pass and report its peak as reference_peak_bytes.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--nproc", type=int, default=1, show_default=True, help="Ranks on this machine, launched through torchrun (gloo on CPU, nccl on CUDA).")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default=None, help="DDP or FSDP2 across the ranks (default ddp with --nproc).")
@seed_option
@generation_options
@format_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write profile.json, timeline.png and report.html here.")
@handle_errors
def profile_command(spec, mode, args, steps, verify, device, nproc, strategy, seed, output_format, out,
                    context_length, new_tokens, kv_cache_dtype, cache_kind, **recipe_options):
    """Measure the memory of real steps of SPEC: a built-in name, file.py:function or module:function.

    Totals come from the allocator's events; categories (param, grad, optimizer_state, activation,
    temporary, input) and modules come from memwise's markers.

    \b
    Example:
      memwise profile gpt --arg preset=tiny --batch-size 8 --precision bf16 --verify --out memwise-out
    """
    from memwise.core.errors import BadInputError
    from memwise.measure.profile import profile
    from memwise.workloads import parse_args

    if steps <= 0:
        raise BadInputError(f"--steps: must be a positive integer, got {steps}")
    check_output_directory(out, "--out")
    recipe = build_recipe(recipe_options)
    if nproc != 1 or strategy is not None:  # memwise.distributed: every rank measured under torchrun (docs/distributed.md)
        from memwise.distributed.entry import end_rank_process, profile_distributed, rank_peaks, under_torchrun

        if mode != "train" or verify:
            raise BadInputError(f"--nproc/--strategy: profile train steps only, without --verify; got --mode {mode}"
                                + (" --verify" if verify else ""))
        apply_seed(seed)
        result = profile_distributed(spec, parse_args(args), recipe, steps, nproc=nproc, strategy=strategy or "ddp", device=device)
        if result is not None:
            show_result(result, output_format, out, stem="profile")
            if output_format != "json":
                click.echo(rank_peaks(result))
        if under_torchrun():  # one rank of the user's torchrun: end without teardown (see end_rank_process)
            end_rank_process(0)
        return
    apply_seed(seed)  # before the model is built (its initial weights) and again before the steps
    workload = load_spec(spec, args)
    apply_seed(seed)
    if mode == "generate":  # a real model.generate under the allocator profiler (memwise.measure.generate)
        from memwise.cli.generate import run_generate_mode

        return run_generate_mode(workload, batch_size=recipe.batch_size, context_length=context_length, new_tokens=new_tokens,
                                 kv_cache_dtype=kv_cache_dtype, cache_kind=cache_kind, budget_bytes=None, measure=True,
                                 output_format=output_format, out=out, device=device)
    progress = StepProgress(f"profiling {workload.name}")
    try:
        result = profile(workload, recipe, steps=steps, mode=mode, device=device, verify=verify, progress=progress)
    finally:
        progress.close()
    show_result(result, output_format, out, stem="profile")
