import time

import pytest
import torch

import memwise
from memwise.core.recipe import Recipe
from memwise.plan import Planner
from memwise.plan.step_time import CALIBRATION_MAX_MICRO_BATCH, calibrate_step_time

FIXED_MS = 30.0
PER_SAMPLE_MS = 3.0


class FixedCostPerPass(torch.nn.Module):
    """A pass costs FIXED_MS plus PER_SAMPLE_MS a sample (slept, so other load barely moves it)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep((FIXED_MS + PER_SAMPLE_MS * batch.shape[0]) / 1e3)
        return self.linear(batch).square().mean()


def test_calibration_recovers_a_known_fixed_cost_per_pass_from_the_searched_sizes():
    workload = memwise.Workload(FixedCostPerPass(), lambda b: torch.randn(b, 4), name="fixed-cost")
    model = calibrate_step_time(workload, Recipe(batch_size=8), [], micro_batch_sizes=[8, 2], repeats=3)
    assert model.pass_fixed_ms == pytest.approx(FIXED_MS, abs=8.0)
    assert model.pass_per_sample_ms == pytest.approx(PER_SAMPLE_MS, abs=1.5)
    # plain at 8, plain at 2, 4 passes of 2: one warm-up and 3 interleaved rounds each
    assert model.measured_steps == 3 * (1 + 3)
    split = model.predict_ms(Recipe(batch_size=8, micro_batch_size=2), [])
    whole = model.predict_ms(Recipe(batch_size=8), [])
    assert split - whole == pytest.approx(3 * FIXED_MS, abs=30.0)  # 3 extra passes, each paying the fixed cost


def test_planner_calibrates_at_the_micro_batch_sizes_it_searches():
    workload = memwise.load_workload("mlp", {"width": 32, "depth": 1, "in_features": 16})
    assert Planner(workload, effective_batch_size=8, allow={"micro_batch_size": [8, 2]})._calibration_micro_batch_sizes() == [2, 8]
    large = Planner(workload, effective_batch_size=256)._calibration_micro_batch_sizes()
    assert min(large) == 1 and max(large) == CALIBRATION_MAX_MICRO_BATCH  # 128 and 256 left out: bounded cost


def test_calibration_without_sizes_names_the_argument():
    workload = memwise.Workload(FixedCostPerPass(), lambda b: torch.randn(b, 4))
    with pytest.raises(ValueError, match="micro_batch_sizes"):
        calibrate_step_time(workload, Recipe(batch_size=8), [], micro_batch_sizes=[])


def test_calibration_with_one_size_or_sizes_that_do_not_divide_still_separates_the_optimizer():
    workload = memwise.Workload(FixedCostPerPass(), lambda b: torch.randn(b, 4), name="fixed-cost")
    for sizes in ([4], [3, 4]):
        model = calibrate_step_time(workload, Recipe(batch_size=12), [], micro_batch_sizes=sizes, repeats=1)
        assert model.pass_fixed_ms + model.pass_per_sample_ms * 4 == pytest.approx(FIXED_MS + PER_SAMPLE_MS * 4, abs=10.0)
