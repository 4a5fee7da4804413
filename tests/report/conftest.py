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


@dataclasses.dataclass(frozen=True, kw_only=True)
class EstimateLike:
    """The fields an `Estimate` will have, optional ones set: what the renderers must show."""

    workload: str
    device: str
    batch_size: int
    peak_bytes: int
    baseline_bytes: int
    by_category: dict
    by_module: tuple
    phase_at_peak: str
    timeline: object
    low_bytes: int
    high_bytes: int
    reserved_bytes: int
    budget_bytes: int
    fits: bool
    reference_peak_bytes: int
    what_if: list
    assumptions: list
    source: str = "estimated"


@pytest.fixture(scope="session")
def estimate_like(profile_result: memwise.Profile) -> EstimateLike:
    peak = profile_result.peak_bytes
    return EstimateLike(
        workload="mlp",
        device="cuda:0 (H100 80GB)",
        batch_size=16,
        peak_bytes=peak,
        baseline_bytes=profile_result.baseline_bytes,
        by_category=profile_result.by_category,
        by_module=profile_result.by_module,
        phase_at_peak=profile_result.phase_at_peak,
        timeline=profile_result.timeline,
        low_bytes=peak - 1024,
        high_bytes=peak + 1024,
        reserved_bytes=peak * 2,
        budget_bytes=peak * 4,
        fits=True,
        reference_peak_bytes=peak // 2,
        what_if=[
            {"change": "precision=bf16", "peak_bytes": peak // 2},
            {"change": "checkpoint=full <all>", "peak_bytes": peak * 3 // 4},
        ],
        assumptions=["the optimizer is AdamW", "no <other> process uses the GPU"],
    )
