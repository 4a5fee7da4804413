"""Distributed training through real torchrun: 2 ranks, gloo, CPU, gpt-tiny.

Each torchrun launch costs a few seconds of process start-up, so the runs are made once per module
and shared.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

import memwise
from memwise.core.errors import BadInputError
from memwise.distributed import DistributedTrainConfig, RankFailedError, check_nproc, launch_train
from memwise.distributed.estimate import ddp_bucket_sizes, estimate_per_rank, shard_bytes
from memwise.distributed.wrap import fsdp_blocks
from memwise.workloads import load_workload

pytestmark = pytest.mark.integration

GLOBAL_BATCH = 8
STEPS = 3
SPEC, ARGS = "gpt", {"preset": "tiny"}


@pytest.fixture(scope="module")
def single_losses():
    result = memwise.train(load_workload(SPEC, ARGS), memwise.Recipe(batch_size=GLOBAL_BATCH), STEPS)
    return result.loss_history


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def run(request):
    config = DistributedTrainConfig(spec=SPEC, args=ARGS, recipe=memwise.Recipe(batch_size=GLOBAL_BATCH), steps=STEPS,
                                    strategy=request.param)
    return launch_train(config, 2, log=lambda line: None)


@pytest.fixture(scope="module")
def runs():
    return {}


def test_training_equals_a_single_process_with_the_same_global_batch(run, single_losses, runs):
    runs[run.strategy] = run
    # Ranks average their gradients over equal halves of the batch: the global-batch gradient up to
    # float32 summation order, so the losses after each update agree to ~1e-6 relative.
    torch.testing.assert_close(torch.tensor(run.loss_history), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)
    assert [r.rank for r in run.ranks] == [0, 1]
    assert run.per_rank_peak_bytes == tuple(r.peak_bytes for r in run.ranks)
    assert run.peak_bytes == run.ranks[0].peak_bytes and run.nproc == 2
    assert all(r.step_ms > 0 for r in run.ranks)


def test_per_rank_estimate_is_within_half_a_percent(run):
    """Made in one process without ranks; every rank runs the same shapes, so one estimate fits all."""
    estimated = estimate_per_rank(load_workload(SPEC, ARGS), memwise.Recipe(batch_size=GLOBAL_BATCH), 2, run.strategy)
    for rank in run.ranks:
        assert abs(estimated.peak_bytes / rank.peak_bytes - 1) <= 0.005, (estimated.peak_bytes, run.per_rank_peak_bytes)
        for category in ("param", "optimizer_state", "grad", "activation"):  # the categories agree too
            assert abs(estimated.by_category[category] - rank.by_category[category]) <= 0.005 * rank.peak_bytes, category
        # A rank holds its own slice of the global batch only (as with a DistributedSampler): exactly.
        assert rank.by_category["input"] == estimated.by_category["input"], (rank.by_category, estimated.by_category)


def test_ddp_estimate_needs_the_bucket(runs):
    """A naive count (a single process at the per-rank batch) misses DDP's bucket, allocated at wrap time."""
    run = runs.get("ddp")
    if run is None:
        pytest.skip("needs the ddp run")
    naive = memwise.estimate(load_workload(SPEC, ARGS), memwise.Recipe(batch_size=GLOBAL_BATCH // 2)).peak_bytes
    assert naive / run.per_rank_peak_bytes[0] - 1 < -0.05


def test_fsdp_state_is_about_half_of_ddp(runs):
    """Parameters and optimizer state per rank, counted from the real storages after the run."""
    if set(runs) != {"ddp", "fsdp"}:
        pytest.skip("needs both runs")
    ratios = [f.state_bytes / d.state_bytes for f, d in zip(runs["fsdp"].ranks, runs["ddp"].ranks)]
    assert all(0.49 <= ratio <= 0.52 for ratio in ratios), ratios  # half, plus dim-0 padding and per-parameter step counters


def test_a_dying_worker_is_reported_with_its_rank(tmp_path):
    spec = f"{Path(__file__).with_name('dying_workload.py')}:dying"
    config = DistributedTrainConfig(spec=spec, args={"die_at_step": 3}, recipe=memwise.Recipe(batch_size=GLOBAL_BATCH), steps=5,
                                    strategy="ddp", checkpoint_dir=str(tmp_path), checkpoint_every=1, measure_steps=1)
    with pytest.raises(RankFailedError, match="rank 1 failed: killed by signal SIGKILL") as error:
        launch_train(config, 2, log=lambda line: None)
    assert error.value.rank == 1
    assert not psutil.Process().children(recursive=True)  # no worker left behind
    for rank in (0, 1):
        checkpoint = torch.load(tmp_path / f"memwise-train-rank{rank}.pt", weights_only=False)
        assert checkpoint["steps_done"] >= 2 and "model" in checkpoint
    assert not list(tmp_path.glob("*.tmp"))


def test_two_nodes_on_localhost_with_c10d_rendezvous(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "memwise.cli.main",
             "train", SPEC, "--arg", "preset=tiny", "--steps", "2", "--batch-size", str(GLOBAL_BATCH), "--strategy", "ddp", "--format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        for node in (0, 1)
    ]
    outputs = [agent.communicate(timeout=240) for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    result = json.loads(outputs[0][0])
    assert result["nproc"] == 2 and len(result["per_rank_peak_bytes"]) == 2 and len(result["loss_history"]) == 2
    assert outputs[1][0].strip() == ""  # only rank 0 reports


def test_bad_input_without_launching():
    with pytest.raises(BadInputError, match="--nproc: 3 ranks need 3 CUDA devices, this machine has 2"):
        check_nproc(3, "cuda", cuda_device_count=2)
    check_nproc(3, "cpu")

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))

    with pytest.raises(BadInputError, match="no wrappable blocks"):
        fsdp_blocks(Flat())
    with pytest.raises(BadInputError, match="does not split evenly"):
        estimate_per_rank(load_workload(SPEC, ARGS), memwise.Recipe(batch_size=7), 2, "ddp")


def test_shard_and_bucket_sizes():
    assert shard_bytes(torch.empty(5, 3), 2) == 3 * 3 * 4  # dim 0 padded from 5 to 6 rows
    parameters = [torch.empty(2**18), torch.empty(2**18), torch.empty(2**17)]  # 1 MiB, 1 MiB, 0.5 MiB in fp32
    # reverse order; the first bucket closes once it reaches 1 MiB, later ones at 25 MiB
    assert ddp_bucket_sizes(parameters) == [2**20 + 2**19, 2**20]


def test_profile_nproc_reports_rank_zero_as_one_process_plus_every_rank():
    from click.testing import CliRunner

    from memwise.cli.main import main

    common = [SPEC, "--arg", "preset=tiny", "--batch-size", str(GLOBAL_BATCH), "--format", "json"]
    ran = CliRunner().invoke(main, ["profile", *common, "--steps", "2", "--nproc", "2", "--strategy", "ddp"])
    assert ran.exit_code == 0, ran.output[-3000:]
    profile = json.loads(ran.stdout)
    single = json.loads(CliRunner().invoke(main, ["profile", *common, "--steps", "1"]).stdout)
    assert set(single) <= set(profile)  # rank 0 has every field of a single-process profile...
    assert profile["nproc"] == 2 and profile["strategy"] == "ddp" and profile["steps"] == 2
    ranks = profile["ranks"]  # ...plus every rank's memory
    assert [r["rank"] for r in ranks] == [0, 1] and all(set(r) >= {"rank", "peak_bytes", "by_category", "step_ms"} for r in ranks)
    assert profile["per_rank_peak_bytes"] == [r["peak_bytes"] for r in ranks]
    assert profile["peak_bytes"] == ranks[0]["peak_bytes"] and profile["by_category"] == ranks[0]["by_category"]
    estimate = json.loads(CliRunner().invoke(main, ["estimate", *common, "--nproc", "2", "--strategy", "ddp"]).stdout)
    for peak_bytes in profile["per_rank_peak_bytes"]:
        assert abs(estimate["peak_bytes"] / peak_bytes - 1) <= 0.005, (estimate["peak_bytes"], profile["per_rank_peak_bytes"])
    refused = CliRunner().invoke(main, ["profile", *common, "--nproc", "2", "--verify"])
    assert refused.exit_code == 2 and "--verify" in refused.output


def test_rank_slice_owns_only_its_samples():
    from memwise.distributed.worker import rank_slice

    ids = torch.arange(8 * 16).reshape(8, 16)
    batch = {"input_ids": ids, "labels": ids.clone(), "mask": torch.ones(16)}  # mask: not batch-sized, shared
    for rank in range(2):
        part = rank_slice(batch, rank, 2)
        assert torch.equal(part["input_ids"], ids[rank * 4:(rank + 1) * 4])
        for name, tensor in part.items():  # no view of the global batch keeps it alive
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
            assert tensor.untyped_storage().data_ptr() != batch[name].untyped_storage().data_ptr(), name


def test_bf16_weights_is_refused_before_any_rank_starts():
    """bf16-weights patches parameters after DDP/FSDP2 wrapped them (FSDP2 then gathers fp32 weights
    against bf16 inputs), so a distributed run or estimate with it is refused up front with exit 2."""
    from click.testing import CliRunner

    from memwise.cli.main import main

    recipe = memwise.Recipe(batch_size=GLOBAL_BATCH, precision="bf16-weights")
    with pytest.raises(BadInputError, match="--precision: 'bf16-weights' is not supported .* fp32, bf16, fp16"):
        DistributedTrainConfig(spec=SPEC, args=ARGS, recipe=recipe, steps=1, strategy="fsdp")
    with pytest.raises(BadInputError, match="bf16-weights"):
        estimate_per_rank(load_workload(SPEC, ARGS), recipe, 2, "ddp")
    common = [SPEC, "--arg", "preset=tiny", "--batch-size", str(GLOBAL_BATCH), "--precision", "bf16-weights", "--nproc", "2"]
    for command in (["train", *common, "--steps", "1", "--strategy", "ddp"], ["estimate", *common, "--strategy", "fsdp"]):
        refused = CliRunner().invoke(main, command)
        assert refused.exit_code == 2 and "supported precisions are fp32, bf16, fp16" in refused.output, refused.output


def test_a_native_abort_names_its_reason():
    """torchrun's report only says SIGABRT; the rank's own last words (from C++) say why."""
    from memwise.distributed.launch import _failure

    output = ("terminate called without an active exception\n"
              "Root Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n"
              "  exitcode  : -6 (pid: 5902)  (SIGABRT)\n  traceback : Signal 6 (SIGABRT) received by PID 5902\n")
    config = DistributedTrainConfig(spec=SPEC, args=ARGS, recipe=memwise.Recipe(batch_size=GLOBAL_BATCH), steps=1)
    error = _failure(config, 2, output, 1)
    assert error.rank == 1
    assert str(error) == ("rank 1 failed: killed by signal SIGABRT (terminate called without an active exception); "
                          "the other ranks were stopped")
