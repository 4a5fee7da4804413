import os

# Before torch starts its OpenMP threads: on a busy 2-core machine, spinning waiters slow every
# step by two orders of magnitude. Passive waiting costs nothing measurable when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


class TinyNet(torch.nn.Module):
    """Two linear layers around a ReLU; forward(x, y) returns the MSE loss when y is given."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(32, width)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(width, 4)

    def forward(self, x, y=None):
        out = self.fc2(self.act(self.fc1(x)))
        return out if y is None else torch.nn.functional.mse_loss(out, y)


@pytest.fixture
def tiny_workload():
    import memwise

    torch.manual_seed(0)
    model = TinyNet()

    def make_batch(batch_size):
        generator = torch.Generator().manual_seed(batch_size)
        return (torch.randn(batch_size, 32, generator=generator), torch.randn(batch_size, 4, generator=generator))

    return memwise.Workload(model, make_batch, name="tiny", default_batch_size=16)
