"""The planner: every feasible plan fits when measured independently; infeasible budgets say why."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memwise
from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe
from memwise.plan import Plan, Planner
from memwise.plan.step_time import StepTimeModel

WORKLOADS = {
    "gpt-tiny": ("gpt", {}),
    "mlp": ("mlp", {"width": 256, "depth": 3}),
}
BATCH = 8


@pytest.fixture(scope="module", params=sorted(WORKLOADS))
def planner(request):
    spec, args = WORKLOADS[request.param]
    return Planner(memwise.load_workload(spec, args), effective_batch_size=BATCH)


@pytest.fixture(scope="module")
def reference(planner):
    """The plain recipe's peak and the parameters' bytes: the budgets tested lie between and around them."""
    plain = planner.estimate(Recipe(batch_size=BATCH)).peak_bytes
    param_bytes = sum(p.numel() * p.element_size() for p in planner.workload.model.parameters())
    return plain, param_bytes


@pytest.mark.parametrize("fraction", [1.1, 0.7, 0.45])
def test_feasible_plan_fits_when_measured_independently(planner, reference, fraction):
    plain, param_bytes = reference
    budget = int(plain * fraction)
    result = planner.plan(budget)
    if not result.feasible:  # allowed only when memwise really cannot reach this budget
        assert result.reason.min_peak_bytes > budget * 0.95
        return
    assert result.recipe.batch_size == BATCH  # the effective batch is kept
    assert result.real_steps <= 2 and result.measured_peak_bytes <= budget
    assert result.predicted_peak_bytes <= budget * 0.95
    # independent check: a fresh profile, and a plain torch.profiler pass without memwise's hooks
    measured = memwise.profile(planner.inputs.workload, result.recipe, steps=2, verify=True)
    assert measured.peak_bytes <= budget and measured.reference_peak_bytes <= budget
    if fraction < 1:
        assert budget > param_bytes  # the grid covers budgets between the plain peak and the params-only floor
        assert result.recipe != Recipe(batch_size=BATCH)  # a remedy was needed
    chosen = [alt for alt in result.alternatives if alt.chosen]
    assert len(chosen) == 1 and chosen[0].recipe == result.recipe and chosen[0].fits


def test_infeasible_budget_reports_the_smallest_reachable_peak(planner, reference):
    _, param_bytes = reference
    result = planner.plan(param_bytes)  # parameters alone fill it: gradients cannot fit too
    assert not result.feasible
    assert result.measured_peak_bytes is None and result.real_steps == 0
    reason = result.reason
    assert reason.min_peak_bytes == result.predicted_peak_bytes > param_bytes * 0.95
    assert reason.recipe == result.recipe and reason.dominant_bytes > 0
    assert str(reason.min_peak_bytes) in reason.message
    # the floor is real: a measured step of the smallest recipe needs more than the budget allows
    measured = memwise.profile(planner.inputs.workload, reason.recipe, steps=2)
    assert measured.peak_bytes > param_bytes * 0.95


def test_plan_round_trips_through_json(planner, reference):
    result = planner.plan(int(reference[0] * 1.1), confirm_steps=False)
    assert Plan.from_dict(result.to_dict()) == result
    data = result.to_dict()
    for field in ("feasible", "budget_bytes", "recipe", "predicted_peak_bytes", "measured_peak_bytes", "predicted_step_ms",
                  "alternatives", "real_steps", "reason", "version"):
        assert field in data
    assert Recipe.from_dict(data["recipe"]) == result.recipe  # the recipe is a file --recipe accepts
    with pytest.raises(BadInputError, match="unknown key 'colour'"):
        Plan.from_dict({**data, "colour": 1})


def test_finalists_are_timed_side_by_side_and_the_fastest_measured_wins():
    """The step-time model ranks the space; the fitting candidates it puts near its fastest are
    timed on this machine, interleaved, and the fastest measured one is the plan."""
    from memwise.plan.planner import MAX_FINALISTS, RACE_ROUNDS

    planner = Planner(memwise.load_workload("mlp", {"width": 256, "depth": 3}), effective_batch_size=BATCH)
    plain = planner.estimate(Recipe(batch_size=BATCH)).peak_bytes
    result = planner.plan(int(plain * 1.3))
    raced = planner._raced_ms
    assert 2 <= len(raced) <= MAX_FINALISTS, raced
    assert result.recipe == min(raced, key=raced.get)
    budget = int(plain * 1.3)
    assert all(planner.estimate(recipe).peak_bytes <= budget * 0.95 for recipe in raced)  # only recipes that fit race
    assert result.calibration_steps == planner.time_model().measured_steps + len(raced) * (1 + RACE_ROUNDS)
    assert any("finalists" in note for note in result.notes)
    assert result.real_steps <= 2 and result.measured_peak_bytes <= result.budget_bytes


FRACTIONS = [0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.3]


@pytest.fixture(scope="module")
def narrow_planner():
    """gpt-tiny over a narrower space (two precisions, two optimizer states), so many budgets stay cheap."""
    workload = memwise.load_workload("gpt", {})
    planner = Planner(workload, effective_batch_size=BATCH, allow={"precision": ["fp32", "bf16-weights"], "optimizer_state": ["fp32", "8bit"]})
    return planner, planner.estimate(Recipe(batch_size=BATCH)).peak_bytes


@pytest.mark.slow
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(FRACTIONS), st.sampled_from(FRACTIONS))
def test_a_larger_budget_never_gives_a_slower_predicted_plan(narrow_planner, low, high):
    planner, plain = narrow_planner
    low, high = sorted((low, high))
    small = planner.plan(int(plain * low), confirm_steps=False)
    large = planner.plan(int(plain * high), confirm_steps=False)
    if small.feasible:
        assert large.feasible and large.predicted_step_ms <= small.predicted_step_ms


FIXED_TIMES = StepTimeModel(pass_fixed_ms=1.0, pass_per_sample_ms=1.0, optimizer_ms=1.0, factors={"checkpoint full": 1.3},
                            optimizer_delta_ms={}, measured_steps=0, calibration_s=0.0)


@settings(max_examples=6, deadline=None)
@given(st.integers(min_value=1, max_value=12))
def test_a_plan_keeps_the_effective_batch_it_was_asked_for(batch):
    workload = memwise.load_workload("mlp", {"width": 32, "depth": 1, "in_features": 16})
    planner = Planner(workload, effective_batch_size=batch, time_model=FIXED_TIMES,
                      allow={"precision": ["fp32"], "optimizer_state": ["fp32"]})
    result = planner.plan(2**30, confirm_steps=False)
    micro = result.recipe.micro_batch_size or result.recipe.batch_size
    assert result.feasible and result.recipe.batch_size == batch == result.effective_batch_size and batch % micro == 0


@pytest.mark.slow
def test_gpu_target_from_a_cpu_machine_plans_on_the_estimate_and_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the plan would be confirmed")
    workload = memwise.load_workload("gpt", {})
    result = memwise.plan(workload, 2 * 2**30, device="RTX-4090", allow={"precision": ["fp32"], "checkpoint": ["none"]})
    assert result.feasible and result.measured_peak_bytes is None and result.real_steps == 0
    assert any(note.startswith("nothing was confirmed") for note in result.notes)
    assert result.device == "RTX-4090" and result.predicted_peak_bytes <= 2 * 2**30 * 0.95


def test_bad_arguments_name_the_argument():
    workload = memwise.load_workload("mlp", {"width": 32, "depth": 1})
    with pytest.raises(BadInputError, match="budget_bytes"):
        memwise.plan(workload, -5)
    with pytest.raises(BadInputError, match="objective"):
        memwise.plan(workload, 2**30, objective="speed")
    with pytest.raises(BadInputError, match="effective_batch_size"):
        memwise.plan(workload, 2**30, effective_batch_size=0)
