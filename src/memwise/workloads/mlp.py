"""`mlp`: a multi-layer perceptron on random data, the simplest workload whose size is a dial."""

import torch
import torch.nn.functional as F
from torch import nn

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError
from memwise.core.workload import Workload


class MLPBlock(nn.Module):
    """One hidden layer: Linear followed by ReLU."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(x))


class MLP(nn.Module):
    """`depth` hidden `MLPBlock`s of `width` units (in `blocks`), then a linear `head` to the classes.

    `forward(x)` returns logits of shape (batch, num_classes); `forward(x, labels)` returns the
    mean cross-entropy loss instead.
    """

    def __init__(self, *, in_features: int, width: int, depth: int, num_classes: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MLPBlock(in_features if index == 0 else width, width) for index in range(depth)
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        if labels is None:
            return logits
        return F.cross_entropy(logits, labels)


def mlp(*, width: int = 512, depth: int = 4, in_features: int = 256, num_classes: int = 10, seed: int = 0) -> Workload:
    """Builds the `mlp` workload: an `MLP` trained on standard-normal inputs with uniform random labels.

    Args:
        width: units of each hidden layer.
        depth: number of hidden Linear+ReLU layers (the model's blocks).
        in_features: size of each input vector.
        num_classes: number of classes of the random labels.
        seed: seeds the initial weights and the generator of the batches.

    Returns:
        A Workload whose `make_batch(batch_size)` returns `(x, labels)`: float32 (batch,
        in_features) and int64 (batch,), drawn afresh on every call from one seeded generator
        (the sequence of batches is reproducible), and whose model returns the cross-entropy loss.
    """
    for name, value in (("width", width), ("depth", depth), ("in_features", in_features), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BadInputError(f"mlp {name}: must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadInputError(f"mlp seed: must be an integer, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MLP(in_features=in_features, width=width, depth=depth, num_classes=num_classes)
    generator = torch.Generator().manual_seed(seed)

    def make_batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        positive_int(batch_size, "batch_size")
        x = torch.randn(batch_size, in_features, generator=generator, device="cpu")
        labels = torch.randint(num_classes, (batch_size,), generator=generator, device="cpu")
        return x, labels

    return Workload(model, make_batch, name="mlp", default_batch_size=32)
