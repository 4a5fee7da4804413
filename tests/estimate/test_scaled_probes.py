"""Kernel scratch of convolution, batch-norm and pooling ops too large to probe whole is probed at
batch k and 2k (as large as the limit allows) and extended to the real batch. The probe limit is lowered here so that small nets
take that path; the estimate is checked against `profile` and against probing the ops whole."""

import pytest
import torch
from torch import nn

import memwise
from memwise.estimate import estimator


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x, y):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return nn.functional.cross_entropy(self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)), y)


class EfficientNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.project = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 10)

    def forward(self, x, y):
        x = self.project(self.depthwise(self.stem(x)))
        return nn.functional.cross_entropy(self.head(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)), y)


@pytest.mark.parametrize("net", [ResNetLike, EfficientNetLike])
def test_scaled_probes_match_profile_and_whole_probes(net, monkeypatch):
    """Peak within 1% of `profile`; every category equal to probing the ops whole.

    Known gap (not fixed here): on these nets the split between gradient, activation and
    temporary differs from `profile`'s even with whole probes (see the issue 8 report)."""
    torch.manual_seed(0)
    workload = memwise.Workload(net(), lambda b: (torch.randn(b, 3, 48, 48), torch.randint(0, 10, (b,))), name=net.__name__)
    recipe = memwise.Recipe(batch_size=16, optimizer="sgd")
    measured = memwise.profile(workload, recipe, steps=2)
    whole = memwise.estimate(workload, recipe, "cpu")
    monkeypatch.setattr(estimator, "MAX_PROBE_BYTES", 2**20)  # the conv/BN/pool ops here have 1.2-2.4 MiB of operands
    scaled = memwise.estimate(workload, recipe, "cpu")
    assert not any("not modelled" in note and "convolution" in note for note in scaled.assumptions)
    assert abs(scaled.peak_bytes / measured.peak_bytes - 1) <= 0.01
    assert scaled.phase_at_peak == measured.phase_at_peak
    for category in ("grad", "activation", "temporary"):
        assert abs(scaled.by_category[category] - whole.by_category[category]) <= 0.01 * measured.peak_bytes, category
