"""torch's FSDPMemTracker peak of one rank's FSDP2 training, on a fake process group in one process.

Run as a script (`python fsdp_tracker.py INDEX...`, indices into test_fsdp_replay.CASES; prints a
JSON list of peaks) so that real FSDP2 and the fake process group never touch the test session:
`fully_shard` on a transformers model leaves global state behind that breaks later tests.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore

from memwise.core.recipe import Mode
from memwise.core.step import StepRunner, resolve_recipe
from memwise.distributed.worker import rank_recipe, rank_slice
from memwise.distributed.wrap import wrap_model
from memwise.workloads import load_workload

STEPS = 3


def tracked_peak(spec, args, recipe, nproc):
    """FSDPMemTracker's peak over 3 steps of the same FSDP2 wrap and step memwise's worker runs."""
    workload = load_workload(spec, args)
    recipe = resolve_recipe(workload, recipe)
    local = rank_recipe(recipe, nproc)
    model = wrap_model(workload.model, "fsdp", torch.device("cpu"), nproc)
    runner = StepRunner(workload, local, Mode.TRAIN, model, torch.device("cpu"))
    batch = rank_slice(workload.make_batch(recipe.batch_size), 0, nproc)
    tracker = FSDPMemTracker(model, runner.optimizer)
    tracker.track_inputs((batch,))
    with tracker:
        for _ in range(STEPS):
            runner.step(batch)
            tracker.reset_mod_stats()  # the tracker keeps per-module stats of one iteration only
    runner.close()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def main(argv: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_fsdp_replay import CASES, NPROC

    dist.init_process_group("fake", rank=0, world_size=NPROC, store=FakeStore())
    try:
        print(json.dumps([tracked_peak(*CASES[int(index)], NPROC) for index in argv]))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
