"""Offload on a CPU-only run: nothing to move, noted on the handle, training unchanged bit for bit."""

import copy

import pytest
import torch

import memwise
from memwise.core.recipe import Mode
from memwise.core.step import StepRunner

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour (offload is a no-op there)")


def train(workload, recipe, batches):
    """Losses of `recipe` over `batches` from a fresh copy of the workload's model, the trained copy and its runner."""
    torch.manual_seed(0)
    model = copy.deepcopy(workload.model)
    runner = StepRunner(workload, recipe, Mode.TRAIN, model, torch.device("cpu"))
    try:
        losses = [runner.step(batch) for batch in batches]
    finally:
        runner.close()
    return losses, model, runner


@pytest.mark.parametrize("offload", ["optimizer", "activations", "all"])
def test_offload_is_same_as_without(offload):
    workload = memwise.load_workload("gpt", {"preset": "tiny", "n_layer": 2, "seq_len": 32})
    batches = [workload.make_batch(4) for _ in range(3)]
    losses, model, _ = train(workload, memwise.Recipe(batch_size=4), batches)
    offloaded_losses, offloaded_model, runner = train(workload, memwise.Recipe(batch_size=4, offload=offload), batches)
    torch.testing.assert_close(offloaded_losses, losses, rtol=0, atol=0)
    for (name, param), offloaded in zip(model.named_parameters(), offloaded_model.parameters()):
        torch.testing.assert_close(offloaded, param, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert type(runner.optimizer) is torch.optim.AdamW  # no host-side master copies on the host
    assert "optimizer_owned" not in runner.handle.state
    assert any(f"offload={offload}" in note and "host already" in note for note in runner.handle.notes)


def test_no_offload_leaves_no_note():
    model = torch.nn.Linear(4, 4)
    assert memwise.apply_(model, memwise.Recipe()).notes == []
