"""Micro-batching: accumulating gradients over equal micro-batches gives the whole batch's step."""

import copy

import pytest
import torch

import memwise
from memwise.core.errors import BadInputError
from memwise.core.recipe import Mode
from memwise.core.step import StepRunner
from tests.strategies.helpers import train

STEPS = 8



def sgd_gpt():
    """gpt tiny trained by plain SGD: the update is linear in the gradient, so parameters compare tightly."""
    base = memwise.load_workload("gpt", {"preset": "tiny", "n_layer": 2, "seq_len": 32})
    return memwise.Workload(base.model, base.make_batch, optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.5),
                            name="gpt-tiny-sgd")


def test_micro_batching_is_same_as_without():
    # The gpt loss is a mean over tokens, so four equal micro-batches each scaled by 1/4 give the
    # whole batch's loss and gradient; only the summation order differs (fp32 rounding).
    workload = sgd_gpt()
    pair = [workload.make_batch(8) for _ in range(2)]
    batches = [pair[step % 2] for step in range(STEPS)]
    losses, model, _ = train(workload, memwise.Recipe(batch_size=8), batches)
    micro_losses, micro_model, _ = train(workload, memwise.Recipe(batch_size=8, micro_batch_size=2), batches)
    assert losses[-1] < 0.97 * losses[0]
    torch.testing.assert_close(micro_losses, losses, rtol=1e-5, atol=0)
    for (name, param), micro in zip(model.named_parameters(), micro_model.parameters()):
        torch.testing.assert_close(micro, param, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def test_micro_batching_runs_one_pass_per_micro_batch():
    workload = sgd_gpt()
    batch = workload.make_batch(8)
    model = copy.deepcopy(workload.model)
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    runner = StepRunner(workload, memwise.Recipe(batch_size=8, micro_batch_size=2), Mode.TRAIN, model, torch.device("cpu"))
    runner.step(batch)
    runner.close()
    assert sizes == [2, 2, 2, 2]


def test_micro_batch_must_divide_the_batch():
    with pytest.raises(BadInputError, match="micro_batch_size: 3 must divide batch_size 8"):
        memwise.Recipe(batch_size=8, micro_batch_size=3)
