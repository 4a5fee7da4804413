"""`tv:<name>` and `timm:<name>`: image classifiers by name (skipped where the packages cannot import)."""

import importlib.util

import pytest
import torch

import memwise
from memwise.core.errors import WorkloadError
from memwise.workloads import load_workload
from memwise.workloads.optional import import_failure
from memwise.workloads.vision import ImageClassification


def _require(package: str) -> None:
    """Skips with the real reason: the package is missing, or installed and failing to import."""
    failure = import_failure(package)
    if failure is not None:
        pytest.skip(f"{package} fails to import: {failure}")
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install 'memwise[vision]')")


def test_the_loss_is_cross_entropy_of_the_main_logits():
    class WithAuxiliary(torch.nn.Module):  # Inception-style: (logits, aux_logits) in training
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(12, 5)

        def forward(self, images):
            logits = self.head(images.flatten(1))
            return logits, logits * 0 + 100

    torch.manual_seed(0)
    model = WithAuxiliary()
    images, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 4, 2, 1])
    loss = ImageClassification(model)(images, labels)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(model.head(images.flatten(1)), labels), rtol=0, atol=0)
    assert ImageClassification(model)(images).shape == (4, 5)


@pytest.mark.parametrize("spec", ["tv:", "timm:"])
def test_a_spec_needs_a_model_name(spec):
    with pytest.raises(WorkloadError, match=f"name a model, e.g. {spec}resnet50"):
        load_workload(spec)


@pytest.mark.parametrize("spec,package", [("tv:resnet18", "torchvision"), ("timm:resnet18", "timm")])
def test_a_classifier_by_name_is_measured_and_estimated_alike(spec, package):
    _require("torchvision")  # timm imports torchvision too
    _require(package)
    args = {"num_classes": 10, "image_size": 64}
    workload = load_workload(spec, args)
    assert workload.name == spec
    images, labels = workload.make_batch(2)
    assert images.shape == (2, 3, 64, 64) and labels.max() < 10
    recipe = memwise.Recipe(batch_size=2, optimizer="sgd")
    measured = memwise.profile(workload, recipe, steps=2)
    estimated = memwise.estimate(load_workload(spec, args, materialize=False), recipe, "cpu")
    assert abs(estimated.peak_bytes / measured.peak_bytes - 1) <= 0.03


@pytest.mark.parametrize("spec,package", [("tv:resnet5O", "torchvision"), ("timm:resnet5O", "timm")])
def test_an_unknown_name_suggests_close_ones(spec, package):
    _require("torchvision")
    _require(package)
    with pytest.raises(WorkloadError, match="unknown model 'resnet5O'; did you mean resnet50"):
        load_workload(spec)
