"""The `--verify` reference: the allocator's own running total, independent of memwise's tracker."""

import ast
from pathlib import Path

import pytest
import torch

import memwise
import memwise.measure.reference
from memwise.measure.reference import reference_peak_bytes


def test_reference_on_an_allocation_pattern_worked_out_by_hand():
    before_the_window = torch.empty(4096)  # allocated outside any profiling: its free is not reported

    def run():
        nonlocal before_the_window
        del before_the_window           # running total 0 (a free of a block the window never saw)
        a = torch.empty(250)            # 1000 bytes                    -> 1000
        b = torch.empty(750)            # 3000                          -> 4000
        del a                           # -1000                         -> 3000
        c = torch.empty(625)            # 2500                          -> 5500
        d = torch.empty(100, dtype=torch.float64)  # 800                -> 6300  (the peak)
        del b, c                        # -5500                         -> 800
        e = torch.empty(1000)           # 4000                          -> 4800
        return d, e                     # both freed when run's result is dropped

    assert reference_peak_bytes(run) == 6300


def test_reference_counts_what_a_kernel_allocates_and_frees_inside():
    x = torch.randn(64, 64)

    def run():
        y = torch.cat([x, x])  # 32768 bytes                            -> 32768
        z = y.sum(dim=0)       # 256                                    -> 33024 (the peak)
        del y                  # -32768                                 -> 256
        return z

    assert reference_peak_bytes(run) == 33024


def test_reference_shares_no_code_with_memwise():
    source = Path(memwise.measure.reference.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert not any(name.startswith("memwise") for name in imported), imported


@pytest.mark.parametrize("recipe", [
    memwise.Recipe(batch_size=8),
    memwise.Recipe(batch_size=8, precision="bf16-weights", checkpoint="full"),
], ids=["fp32", "bf16-weights+checkpoint"])
def test_profile_peak_equals_the_independent_reference(recipe):
    workload = memwise.load_workload("mlp", {"width": 96, "depth": 3})
    result = memwise.profile(workload, recipe, steps=2, verify=True)
    assert result.reference_peak_bytes == result.peak_bytes
    # the reference is not a restatement: it includes the weights only because the fresh copy of
    # the model is made inside its window
    assert result.reference_peak_bytes > result.baseline_bytes > 0
