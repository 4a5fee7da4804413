"""The planner with several ranks: DDP and FSDP2 searched on per-rank estimates, the budget per rank."""

import pytest

import memwise
from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe
from memwise.distributed.estimate import estimate_per_rank
from memwise.plan import Plan, Planner
from memwise.plan.step_time import comm_bytes_per_pass

NPROC = 2
BATCH = 8
# parameters, gradients and Adam state dominate this MLP: what FSDP2 shards and DDP replicates
SPEC = ("mlp", {"width": 256, "depth": 3})
NARROW = {"precision": ["fp32"], "optimizer_state": ["fp32"], "checkpoint": ["none"]}


@pytest.fixture(scope="module")
def workload():
    return memwise.load_workload(*SPEC)


@pytest.fixture(scope="module")
def floors(workload):
    """Per-rank predicted figure of the smallest recipe in the narrow space (micro-batch 1), by strategy."""
    result = {}
    for strategy in ("ddp", "fsdp"):
        planner = Planner(workload, effective_batch_size=BATCH, allow=NARROW, nproc=NPROC, strategy=strategy)
        result[strategy] = min(planner.estimate(c.recipe).total_bytes for c in planner.smallest_candidates())
    assert result["fsdp"] < result["ddp"]
    return result


def test_a_budget_only_fsdp_meets_gives_an_fsdp_plan_within_the_budget_per_rank(workload, floors):
    budget = int((floors["ddp"] + floors["fsdp"]) / 2 / 0.95)
    result = memwise.plan(workload, budget, effective_batch_size=BATCH, allow=NARROW, nproc=NPROC)
    assert result.feasible and result.strategy == "fsdp" and result.nproc == NPROC
    assert result.predicted_peak_bytes <= budget * 0.95
    # the figure is the per-rank estimate of the chosen recipe, and DDP could not run that recipe in the budget
    fsdp = estimate_per_rank(workload, result.recipe, NPROC, "fsdp", "cpu", what_if=False)
    ddp = estimate_per_rank(workload, result.recipe, NPROC, "ddp", "cpu", what_if=False)
    assert fsdp.total_bytes == result.predicted_peak_bytes and ddp.total_bytes > budget * 0.95
    assert result.recipe.batch_size == BATCH and result.effective_batch_size == BATCH
    assert result.measured_peak_bytes is None and result.real_steps == 0
    assert any("nothing was confirmed" in note for note in result.notes)
    assert any(note.startswith("ddp considered: infeasible") for note in result.notes)
    assert Plan.from_dict(result.to_dict()) == result


def test_a_fixed_strategy_is_kept_even_when_infeasible(workload, floors):
    budget = int((floors["ddp"] + floors["fsdp"]) / 2 / 0.95)
    result = memwise.plan(workload, budget, effective_batch_size=BATCH, allow=NARROW, nproc=NPROC, strategy="ddp")
    assert not result.feasible and result.strategy == "ddp"
    assert result.reason.min_peak_bytes > budget * 0.95


def test_one_process_plans_carry_no_strategy_and_old_plan_json_still_loads(workload):
    result = memwise.plan(workload, 2**30, effective_batch_size=BATCH, allow=NARROW)
    assert result.nproc == 1 and result.strategy is None and result.real_steps == 2
    assert result.measured_peak_bytes is not None and result.measured_peak_bytes <= 2**30
    data = result.to_dict()
    del data["nproc"], data["strategy"]  # a plan written before sharding was searched
    assert Plan.from_dict(data) == result


def test_communication_per_pass_follows_the_collectives():
    # ring all-reduce: 2 (n-1)/n of the gradients; FSDP2: two all-gathers + one reduce-scatter, 3 (n-1)/n
    assert comm_bytes_per_pass("ddp", 1000, 2) == 1000 and comm_bytes_per_pass("fsdp", 1000, 2) == 1500
    assert comm_bytes_per_pass("ddp", 1000, 4) == 1500


def test_bad_arguments_name_the_argument(workload):
    with pytest.raises(BadInputError, match="effective_batch_size.*3 ranks"):
        memwise.plan(workload, 2**30, effective_batch_size=BATCH, nproc=3)
    with pytest.raises(BadInputError, match="strategy"):
        memwise.plan(workload, 2**30, effective_batch_size=BATCH, strategy="fsdp")
    with pytest.raises(BadInputError, match="strategy.*ddp, fsdp"):
        memwise.plan(workload, 2**30, effective_batch_size=BATCH, nproc=2, strategy="zero3")
    with pytest.raises(BadInputError, match="nproc"):
        memwise.plan(workload, 2**30, effective_batch_size=BATCH, nproc=0)


def test_precisions_the_distributed_runner_cannot_train_are_not_searched(workload):
    planner = Planner(workload, effective_batch_size=BATCH, nproc=NPROC, strategy="fsdp")
    assert all(c.recipe.precision.value != "bf16-weights" for c in planner.candidates)
    assert any("bf16-weights was not searched" in note for note in planner.notes)
    with pytest.raises(BadInputError, match="allow.*precision"):
        Planner(workload, effective_batch_size=BATCH, nproc=NPROC, strategy="fsdp", allow={"precision": ["bf16-weights"]})
