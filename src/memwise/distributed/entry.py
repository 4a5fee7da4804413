"""What `memwise train|profile --nproc N --strategy S` does: launch torchrun, or be one rank under it."""

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from memwise.core.recipe import Recipe
from memwise.distributed.config import DistributedTrainConfig
from memwise.distributed.launch import launch_train
from memwise.distributed.result import DistributedProfile, DistributedTrainResult
from memwise.distributed.worker import run_rank


def under_torchrun(environ: dict[str, str] | None = None) -> bool:
    """Whether this process is a worker that torchrun started (it sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    environ = os.environ if environ is None else environ
    return all(name in environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"))


def end_rank_process(code: int = 0) -> NoReturn:
    """Ends a rank's process once its work is done and its outputs are written: flushes stdout and
    stderr, then exits without interpreter teardown.

    gloo's worker threads outlive `destroy_process_group` while DDP/FSDP2 still hold the group, and
    one of them may drop the last reference to a finished collective's work (tensors with Python
    objects) while the interpreter finalizes: it then needs the GIL, and the process aborts
    ("terminate called without an active exception", SIGABRT) after a successful run. Seen in about
    1 run in 10 of 2-rank FSDP2 on CPU with torch 2.13 (core dump: ~AsyncGatherWork on
    ProcessGroupGloo::runLoop during Py_FinalizeEx). Nothing is left to tear down by then.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def train_distributed(
    spec: str, args: dict[str, Any], recipe: Recipe, steps: int, *, nproc: int, strategy: str, device: str,
    checkpoint_dir: Path | None, checkpoint_every: int, result_path: Path | None = None,
) -> DistributedTrainResult | None:
    """Runs distributed training; returns the result in the process that reports it, else None.

    Typed after a torchrun command (multi-node), this process is one rank: it trains and, on rank
    0, returns the result. Otherwise it launches `nproc` ranks on this machine through torchrun.
    """
    config = DistributedTrainConfig(
        spec=spec, args=args, recipe=recipe, steps=steps, strategy=strategy, device=device.split(":")[0],
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir is not None else None, checkpoint_every=checkpoint_every,
        result_path=str(result_path) if result_path is not None else None,
    )
    return _run_or_launch(config, nproc)


def profile_distributed(
    spec: str, args: dict[str, Any], recipe: Recipe, steps: int, *, nproc: int, strategy: str, device: str,
) -> DistributedProfile | None:
    """Measures `steps` training steps on every rank (DDP or FSDP2); returns the profile in the
    process that reports it (rank 0, or the launcher), else None. Launches like `train_distributed`."""
    config = DistributedTrainConfig(spec=spec, args=args, recipe=recipe, steps=steps, measure_steps=steps, strategy=strategy,
                                    device=device.split(":")[0], task="profile")
    return _run_or_launch(config, nproc)


def _run_or_launch(config: DistributedTrainConfig, nproc: int) -> DistributedTrainResult | DistributedProfile | None:
    if under_torchrun():
        return run_rank(config, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    return launch_train(config, nproc)


def summary(result: DistributedTrainResult) -> str:
    """One line: steps, final loss, and each rank's peak."""
    return f"{result.steps_done} steps on {result.nproc} ranks ({result.strategy}), final loss {result.loss_history[-1]:.4f}; {rank_peaks(result)}"


def rank_peaks(result: DistributedTrainResult | DistributedProfile) -> str:
    """`peak rank 0 X MiB, rank 1 Y MiB, ...`: each rank's measured peak."""
    return "peak " + ", ".join(f"rank {r.rank} {r.peak_bytes / 2**20:.2f} MiB" for r in result.ranks)
