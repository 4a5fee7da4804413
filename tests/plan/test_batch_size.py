"""find_batch_size: the largest batch that fits, sized for the largest input, confirmed by real steps."""

import pytest
import torch

import memwise
from memwise.core.errors import BadInputError
from memwise.core.recipe import Recipe
from memwise.plan import BatchSizeResult, find_batch_size
from memwise.plan.input_sizing import LargestInput


@pytest.fixture(scope="module")
def variable_gpt():
    """gpt-tiny with sequences of 16 to 64 tokens; it declares its largest input (64)."""
    return memwise.load_workload("gpt", {"seq_len": "16-64"})


def test_finds_the_largest_batch_that_fits_with_two_real_steps(variable_gpt):
    budget = memwise.estimate(variable_gpt, Recipe(batch_size=12)).peak_bytes  # independent of the bisection
    result = find_batch_size(variable_gpt, budget)
    assert result.feasible and result.trials == 2
    assert result.sized_for.source == "make_largest_batch" and result.sized_for.shapes[0] == (result.batch_size, 64)
    # measured independently: the answer fits, one more sample does not leave the margin free
    fits = memwise.profile(LargestInput(variable_gpt).workload, Recipe(batch_size=result.batch_size), steps=2)
    over = memwise.profile(LargestInput(variable_gpt).workload, Recipe(batch_size=result.batch_size + 1), steps=2)
    assert fits.peak_bytes <= budget and result.measured_peak_bytes <= budget
    assert over.peak_bytes > budget * 0.95
    assert BatchSizeResult.from_dict(result.to_dict()) == result


@pytest.mark.slow
def test_sized_for_the_longest_sequence_not_the_ones_drawn(variable_gpt):
    """Sized on drawn batches (as peers do), a later longer batch would overflow; sized for 64 tokens, none does."""
    budget = memwise.estimate(variable_gpt, Recipe(batch_size=12)).peak_bytes
    result = find_batch_size(variable_gpt, budget, confirm_steps=False)
    short = memwise.Workload(variable_gpt.model, lambda b: variable_gpt.make_batch(b, 16), name="short")  # the shortest draws
    naive = find_batch_size(short, budget, confirm_steps=False)
    assert naive.batch_size > result.batch_size
    longest = memwise.profile(LargestInput(variable_gpt).workload, Recipe(batch_size=naive.batch_size), steps=2)
    assert longest.peak_bytes > budget  # the naive answer runs out of memory on a long batch


def test_undeclared_workload_samples_and_says_so(tiny_workload):
    lengths = iter([3, 9, 5] * 100)

    def make_batch(batch_size):
        width = next(lengths)
        return torch.randn(batch_size, 32), torch.randn(batch_size, 4 * width)[:, :4]

    workload = memwise.Workload(tiny_workload.model, make_batch, name="varying")
    sizing = LargestInput(workload, samples=3).sizing(2)
    assert sizing.source == "sampled" and sizing.samples == 3
    assert "declares no make_largest_batch" in sizing.note


def test_not_even_batch_one_fits_is_a_result(tiny_workload):
    result = find_batch_size(tiny_workload, 1000)
    assert not result.feasible and result.batch_size is None and result.trials == 0
    assert result.predicted_peak_bytes > 1000


def test_bad_arguments_name_the_argument(tiny_workload):
    with pytest.raises(BadInputError, match="budget_bytes"):
        find_batch_size(tiny_workload, 0)
    with pytest.raises(BadInputError, match="margin"):
        find_batch_size(tiny_workload, 10**9, margin=0.9)
    with pytest.raises(BadInputError, match="make_largest_batch"):
        memwise.Workload(tiny_workload.model, tiny_workload.make_batch, make_largest_batch=3)
