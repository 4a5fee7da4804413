"""Small workloads for the compression search tests: a classifier on separable data, fast to search."""

import functools

import torch
from torch import nn

import memwise


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _data(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.eye(4, 16) * 4
    labels = torch.randint(4, (count,), generator=generator)
    return centers[labels] + torch.randn(count, 16, generator=generator), labels


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyClassifier()
    x_train, y_train = _data(512, 0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.state_dict()


def tiny(no_evaluate: bool = False, never_good_enough: bool = False, untrained: bool = False) -> memwise.Workload:
    """A trained 3-layer classifier (accuracy ~1.0 on held-out data); trained once per process.

    With `untrained`, the same workload with the model as constructed (random weights).
    """
    model = TinyClassifier()
    if not untrained:
        model.load_state_dict(_trained_state())
    model.eval()
    x_train, y_train = _data(512, 0)
    x_test, y_test = _data(256, 1)

    def evaluate(candidate: nn.Module) -> float:
        if never_good_enough:
            return 1.0 if candidate is model else 0.0
        with torch.no_grad():
            return float((candidate(x_test).argmax(dim=1) == y_test).float().mean())

    generator = torch.Generator().manual_seed(2)

    def make_batch(batch_size: int):
        index = torch.randint(len(y_train), (batch_size,), generator=generator)
        return x_train[index], y_train[index]

    return memwise.Workload(model, make_batch, evaluate=None if no_evaluate else evaluate, name="tiny-classifier")
