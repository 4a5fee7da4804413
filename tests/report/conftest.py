"""A real `Profile` of a small MLP, measured once for all report tests."""

import dataclasses

import pytest
import torch
from torch import nn

import memwise


@pytest.fixture(scope="session")
def profile_result() -> memwise.Profile:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    workload = memwise.Workload(
        model,
        lambda batch_size: torch.randn(batch_size, 32),
        loss_fn=lambda output, batch: output.square().mean(),
        name="mlp",
    )
    return memwise.profile(workload, memwise.Recipe(batch_size=16), steps=2)


@pytest.fixture(scope="session")
def hostile_profile(profile_result: memwise.Profile) -> memwise.Profile:
    """The same profile under a workload name that is markup in HTML, Markdown and rich."""
    return dataclasses.replace(profile_result, workload='<script>alert("x")</script> & [bold]mlp[/bold] | *a*')


@pytest.fixture(scope="session")
def verified_profile() -> memwise.Profile:
    """A real profile with `verify=True`, so it has a reference peak."""
    workload = memwise.load_workload("mlp", {"width": 32, "depth": 1})
    return memwise.profile(workload, memwise.Recipe(batch_size=8), steps=1, verify=True)


@pytest.fixture(scope="session")
def estimate_result() -> memwise.Estimate:
    """A real `Estimate` for a catalog GPU (estimated on this CPU): CUDA fields, a budget, what-ifs."""
    workload = memwise.load_workload("gpt", {"preset": "tiny"}, materialize=False)
    result = memwise.estimate(workload, memwise.Recipe(batch_size=4, optimizer="sgd"), "H100-80GB", budget_bytes=2**30)
    assert result.reserved_bytes is not None and result.context_bytes is not None and result.what_if
    return result


@pytest.fixture(scope="session")
def hostile_estimate(estimate_result: memwise.Estimate) -> memwise.Estimate:
    """The real estimate with markup in a what-if change and an assumption (as a user's workload could put there)."""
    first = dataclasses.replace(estimate_result.what_if[0], change="checkpoint=full <all> | *b*")
    return dataclasses.replace(
        estimate_result,
        what_if=(first, *estimate_result.what_if[1:]),
        assumptions=(*estimate_result.assumptions, "no <other> process uses the GPU"),
    )
