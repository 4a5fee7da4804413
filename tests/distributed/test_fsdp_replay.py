"""The FSDP2 per-rank estimate against torch's own FSDPMemTracker, in one process.

The tracker runs real FSDP2 (`fully_shard`) on a fake process group and counts every tensor FSDP2
and the step allocate, by module and phase: an independent reference that needs no ranks and
has no collective library of its own (the estimate's model without gloo's copies, as on NCCL).
The real-rank check (gloo through torchrun) is in test_distributed.py.
"""

import pytest
import torch
import torch.distributed as dist

import memwise
from memwise.core.recipe import Mode
from memwise.core.step import StepRunner, resolve_recipe
from memwise.distributed.estimate import fsdp_rank_log
from memwise.distributed.worker import rank_recipe, rank_slice
from memwise.distributed.wrap import wrap_model, fsdp_blocks
from memwise.estimate.estimator import MAX_PROBE_BYTES, resolve_device, trace_log
from memwise.estimate.op_probe import OpProbe
from memwise.workloads import load_workload

tracker_module = pytest.importorskip("torch.distributed._tools.fsdp2_mem_tracker", reason="needs torch's FSDPMemTracker")
fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg", reason="needs torch's fake process group")

NPROC = 2
CASES = [  # (spec, args, global recipe)
    ("mlp", {"width": 256, "depth": 3}, memwise.Recipe(batch_size=8, optimizer="adamw", optimizer_impl="for-loop")),  # peak in backward's prefetch
    ("mlp", {"width": 512, "depth": 2}, memwise.Recipe(batch_size=8, optimizer="adamw")),
    ("gpt", {"preset": "tiny"}, memwise.Recipe(batch_size=8)),  # peak where the activations are
    ("hf:gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}, memwise.Recipe(batch_size=4)),
    ("gpt", {"preset": "tiny"}, memwise.Recipe(batch_size=8, checkpoint="full")),  # recompute inside each block's backward
    ("gpt", {"preset": "tiny"}, memwise.Recipe(batch_size=8, precision="bf16")),  # autocast casts of the gathered weights
]


@pytest.fixture(scope="module")
def fake_group():
    dist.init_process_group("fake", rank=0, world_size=NPROC, store=fake_pg.FakeStore())
    yield
    dist.destroy_process_group()


def tracked_peak(spec, args, recipe):
    """FSDPMemTracker's peak over 3 steps of the same FSDP2 wrap and step memwise's worker runs."""
    workload = load_workload(spec, args)
    recipe = resolve_recipe(workload, recipe)
    local = rank_recipe(recipe, NPROC)
    model = wrap_model(workload.model, "fsdp", torch.device("cpu"), NPROC)
    runner = StepRunner(workload, local, Mode.TRAIN, model, torch.device("cpu"))
    batch = rank_slice(workload.make_batch(recipe.batch_size), 0, NPROC)
    tracker = tracker_module.FSDPMemTracker(model, runner.optimizer)
    tracker.track_inputs((batch,))
    with tracker:
        for _ in range(3):
            runner.step(batch)
            tracker.reset_mod_stats()  # the tracker keeps per-module stats of one iteration only
    runner.close()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("spec, args, recipe", CASES, ids=[f"{spec}-{'-'.join(map(str, args.values()))}-{r.checkpoint.value}-{r.precision.value}" for spec, args, r in CASES])
def test_replay_equals_fsdp_mem_tracker(fake_group, spec, args, recipe):
    workload = load_workload(spec, args)
    local = rank_recipe(resolve_recipe(workload, recipe), NPROC)
    blocks = fsdp_blocks(workload.model)
    log = trace_log(workload, local, Mode.TRAIN, resolve_device("cpu"), OpProbe(max_probe_bytes=MAX_PROBE_BYTES),
                    backward_marks={name for name, _ in blocks})
    estimated = fsdp_rank_log(log, workload.model, blocks, NPROC, gloo=False).summarize().peak_bytes
    tracked = tracked_peak(spec, args, recipe)
    print(f"{spec} {args}: replay {estimated}, FSDPMemTracker {tracked}")
    assert abs(estimated / tracked - 1) <= 0.005, (estimated, tracked)

