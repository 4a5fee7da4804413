"""Offload on a CPU-only run: nothing to move, noted on the handle, training unchanged bit for bit."""


import pytest
import torch

import memwise
from tests.strategies.helpers import train

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour (offload is a no-op there)")



@pytest.mark.parametrize("offload", ["optimizer", "activations", "all"])
def test_offload_is_same_as_without(offload):
    workload = memwise.load_workload("gpt", {"preset": "tiny", "n_layer": 2, "seq_len": 32})
    batches = [workload.make_batch(4) for _ in range(3)]
    losses, model, _ = train(workload, memwise.Recipe(batch_size=4), batches)
    offloaded_losses, offloaded_model, runner = train(workload, memwise.Recipe(batch_size=4, offload=offload), batches)
    torch.testing.assert_close(offloaded_losses, losses, rtol=0, atol=0)
    for (name, param), offloaded in zip(model.named_parameters(), offloaded_model.parameters()):
        torch.testing.assert_close(offloaded, param, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert type(runner.optimizer) is torch.optim.AdamW  # no host-side master copies on the host
    assert runner.handle.effects.optimizer_owned == []
    assert any(f"offload={offload}" in note and "host already" in note for note in runner.handle.notes)


def test_no_offload_leaves_no_note():
    model = torch.nn.Linear(4, 4)
    assert memwise.apply_(model, memwise.Recipe()).notes == []


def test_master_weights_optimizer_works_with_grad_scaler():
    """fp16 with optimizer offload on a GPU: GradScaler must find gradients on the masters."""
    from memwise.strategies.master_weights import MasterWeightsOptimizer

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4, 4))
    master = torch.nn.Parameter(param.detach().clone())
    optimizer = MasterWeightsOptimizer([(param, master)], torch.optim.SGD([master], lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = param.detach().clone()
    scaler.scale((param * 2).sum()).backward()
    optimizer.sync_grads()
    scaler.step(optimizer)
    scaler.update()
    torch.testing.assert_close(param.detach(), before - 0.1 * 2, rtol=0, atol=1e-6)
    assert master.grad is None
