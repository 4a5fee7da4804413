"""The FSDP2 per-rank estimate against torch's own FSDPMemTracker.

The tracker runs real FSDP2 (`fully_shard`) on a fake process group and counts every tensor FSDP2
and the step allocate, by module and phase: an independent reference that needs no ranks and
has no collective library of its own (the estimate's model without gloo's copies, as on NCCL).
It runs in a process of its own (fsdp_tracker.py). The real-rank check (gloo through torchrun)
is in test_distributed.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import memwise
from memwise.core.recipe import Mode
from memwise.core.step import resolve_recipe
from memwise.distributed.estimate import fsdp_rank_log
from memwise.distributed.worker import rank_recipe
from memwise.distributed.wrap import fsdp_blocks
from memwise.estimate.estimator import MAX_PROBE_BYTES, resolve_device, trace_log
from memwise.estimate.op_probe import OpProbe
from memwise.workloads import load_workload

pytest.importorskip("torch.distributed._tools.fsdp2_mem_tracker", reason="needs torch's FSDPMemTracker")
pytest.importorskip("torch.testing._internal.distributed.fake_pg", reason="needs torch's fake process group")

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
def tracked():
    """FSDPMemTracker's peak for every case, measured in a separate process (fsdp_tracker.py)."""
    script = Path(__file__).with_name("fsdp_tracker.py")
    done = subprocess.run([sys.executable, str(script), *map(str, range(len(CASES)))], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{spec}-{'-'.join(map(str, args.values()))}-{r.checkpoint.value}-{r.precision.value}" for spec, args, r in CASES])
def test_replay_equals_fsdp_mem_tracker(tracked, index):
    spec, args, recipe = CASES[index]
    workload = load_workload(spec, args)
    local = rank_recipe(resolve_recipe(workload, recipe), NPROC)
    blocks = fsdp_blocks(workload.model)
    log = trace_log(workload, local, Mode.TRAIN, resolve_device("cpu"), OpProbe(max_probe_bytes=MAX_PROBE_BYTES),
                    backward_marks={name for name, _ in blocks})
    estimated = fsdp_rank_log(log, workload.model, blocks, NPROC, gloo=False).summarize().peak_bytes
    assert abs(estimated / tracked[index] - 1) <= 0.005, (estimated, tracked[index])
