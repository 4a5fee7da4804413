"""`tv:<name>` and `timm:<name>`: torchvision and timm image classifiers by name, with random weights.

A step is a batch of random images and labels through the classifier and a cross-entropy loss,
the usual image-classification training step; no weights or data are downloaded.
"""

import difflib
from typing import Any

import torch

from memwise.core.checks import positive_int
from memwise.core.errors import WorkloadError
from memwise.core.workload import Workload
from memwise.workloads.optional import broken_package_message, import_failure


class ImageClassification(torch.nn.Module):
    """`model(images)` and, when labels are given, the cross-entropy loss of its logits.

    Auxiliary outputs some classifiers return in training (Inception's `aux_logits`) are left out:
    the loss is that of the main logits.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        output = self.model(images)
        logits = output.logits if hasattr(output, "logits") else output[0] if isinstance(output, (tuple, list)) else output
        return logits if labels is None else torch.nn.functional.cross_entropy(logits, labels)


def torchvision_model(name: str, *, num_classes: int = 1000, image_size: int = 224, seed: int = 0) -> Workload:
    """Builds `tv:<name>`: `torchvision.models.get_model(name, weights=None, num_classes=...)`.

    Args:
        name: a torchvision classification model, e.g. `resnet50`, `efficientnet_b0`, `vit_b_16`.
        num_classes: classes of the head (and of the random labels).
        image_size: height and width of the random RGB images.
        seed: seeds the initial weights and the batches.

    Returns:
        A Workload named `tv:<name>` whose batches are `(images, labels)`: float32
        (batch, 3, image_size, image_size) images and int64 labels below `num_classes`.
    """
    torchvision = _import_for(f"tv:{name}", "torchvision", extra="vision")
    known = sorted(torchvision.models.list_models(module=torchvision.models))
    if name not in known:
        raise WorkloadError(_unknown(f"tv:{name}", name, known, "torchvision.models.list_models()"))
    _check(num_classes=num_classes, image_size=image_size, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        except Exception as error:  # noqa: BLE001  (the model's own checks, e.g. an image size it cannot take)
            raise WorkloadError(f"tv:{name}: building the model failed: {type(error).__name__}: {error}") from error
    return _classification_workload(f"tv:{name}", model, num_classes, image_size, seed)


def timm_model(name: str, *, num_classes: int = 1000, image_size: int = 224, seed: int = 0) -> Workload:
    """Builds `timm:<name>`: `timm.create_model(name, pretrained=False, num_classes=...)`.

    Args:
        name: a timm model, e.g. `resnet50`, `vit_small_patch16_224`, `convnext_tiny`.
        num_classes, image_size, seed: as for `torchvision_model`; models with a fixed input size
            (most ViTs) need `image_size` to match it.

    Returns:
        A Workload named `timm:<name>`, batches as for `torchvision_model`.
    """
    _import_for(f"timm:{name}", "torchvision", extra="vision")  # timm imports torchvision
    timm = _import_for(f"timm:{name}", "timm", extra="vision")
    if not timm.is_model(name):
        raise WorkloadError(_unknown(f"timm:{name}", name, timm.list_models(), "timm.list_models()"))
    _check(num_classes=num_classes, image_size=image_size, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        except Exception as error:  # noqa: BLE001
            raise WorkloadError(f"timm:{name}: building the model failed: {type(error).__name__}: {error}") from error
    return _classification_workload(f"timm:{name}", model, num_classes, image_size, seed)


def _classification_workload(spec: str, model: torch.nn.Module, num_classes: int, image_size: int, seed: int) -> Workload:
    generator = torch.Generator().manual_seed(seed)

    def make_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        positive_int(batch_size, "batch_size")
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        labels = torch.randint(num_classes, (batch_size,), generator=generator)
        return images, labels

    return Workload(
        ImageClassification(model), make_batch, name=spec, default_batch_size=32,
        extras={"num_classes": num_classes, "image_size": image_size},
    )


def _import_for(spec: str, package: str, *, extra: str) -> Any:
    failure = import_failure(package)
    if failure is not None:
        raise WorkloadError(f"{spec}: {broken_package_message(package, failure)}")
    try:
        return __import__(package)
    except ImportError as error:
        raise WorkloadError(f"{spec} needs {package}, which is not installed: pip install 'memwise[{extra}]'") from error


def _unknown(spec: str, name: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"{spec}: unknown model {name!r}; {hint}{len(known)} models are available, see {where}"


def _check(**values: Any) -> None:
    for key, value in values.items():
        minimum = 0 if key == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise WorkloadError(f"--arg {key}={value!r}: must be an integer >= {minimum}")
