"""Each optimizer implementation's memory, estimated and measured on CPU.

foreach AdamW allocates intermediates as large as all the parameters together (the 27 GB
temporary of a 7B step); for-loop and fused ones work one tensor (or one fused kernel) at a time.
"""

import pytest

import memwise


@pytest.fixture(scope="module")
def workload():
    return memwise.load_workload("mlp")


@pytest.mark.parametrize("impl", ["foreach", "fused", "for-loop"])
def test_optimizer_impl_estimate_matches_profile(workload, impl):
    recipe = memwise.Recipe(batch_size=8, optimizer="adamw", optimizer_impl=impl)
    measured = memwise.profile(workload, recipe, steps=2)
    predicted = memwise.estimate(workload, recipe, "cpu")
    assert abs(predicted.peak_bytes / measured.peak_bytes - 1) <= 0.01
    assert abs(predicted.by_category["temporary"] - measured.by_category["temporary"]) <= 0.01 * measured.peak_bytes


def test_foreach_temporaries_scale_with_all_parameters(workload):
    """Why the field matters: foreach's optimizer-phase intermediates cover all parameters at once,
    for-loop's one tensor at a time; the estimate predicts the measured difference."""
    params = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    measured, predicted = {}, {}
    for impl in ("foreach", "for-loop"):
        recipe = memwise.Recipe(batch_size=1, optimizer="adamw", optimizer_impl=impl)
        measured[impl] = memwise.profile(workload, recipe, steps=2).peak_bytes
        predicted[impl] = memwise.estimate(workload, recipe, "cpu").peak_bytes
    measured_difference = measured["foreach"] - measured["for-loop"]
    assert measured_difference >= 0.25 * params
    assert abs((predicted["foreach"] - predicted["for-loop"]) / measured_difference - 1) <= 0.02


def test_fused_optimizer_is_offered_where_it_saves_memory():
    workload = memwise.load_workload("gpt", {"preset": "tiny"})
    result = memwise.estimate(workload, memwise.Recipe(batch_size=1, optimizer="adamw", optimizer_impl="foreach"), "T4")
    fused = next(row for row in result.what_if if "fused" in row.change)
    direct = memwise.estimate(workload, memwise.Recipe(batch_size=1, optimizer="adamw", optimizer_impl="fused"), "T4", what_if=False)
    assert fused.peak_bytes == direct.peak_bytes < result.peak_bytes
