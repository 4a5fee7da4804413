"""Precision: bf16/fp16 autocast and bf16 weights with fp32 masters train like fp32, within stated tolerances."""

import copy

import pytest
import torch

import memwise
from memwise.core.recipe import Mode
from memwise.core.step import StepRunner
from memwise.strategies.master_weights import MasterWeightsOptimizer
from tests.strategies.helpers import train

STEPS = 12



def update_cosine(model, trained, initial):
    """Cosine similarity of two runs' total parameter updates (1.0: same direction)."""
    updates = [torch.cat([(p.detach().float() - p0).flatten() for p, p0 in zip(m.parameters(), initial)]) for m in (model, trained)]
    return torch.nn.functional.cosine_similarity(*updates, dim=0).item()


@pytest.fixture(scope="module")
def gpt():
    # Two batches seen in turn: the loss falls by ~10% over the run, so a strategy that stopped
    # training (or trained differently) shows up in the losses, not only in the parameters.
    workload = memwise.load_workload("gpt", {"preset": "tiny", "n_layer": 2, "seq_len": 32})
    pair = [workload.make_batch(8) for _ in range(2)]
    batches = [pair[step % 2] for step in range(STEPS)]
    losses, model, _ = train(workload, memwise.Recipe(batch_size=8), batches)
    assert losses[-1] < 0.95 * losses[0]
    return workload, batches, losses, model


# Tolerances, stated: autocast keeps weights, loss and optimizer in fp32 and rounds matmul inputs to
# 8 (bf16) or 11 (fp16) mantissa bits, measured ~4e-5 and ~7e-6 relative on the loss; bf16 weights
# also compute the loss in bf16, whose spacing near 6.0 is 0.031 (0.5%): measured 1.0e-2.
@pytest.mark.parametrize("precision,loss_rtol", [("bf16", 2e-3), ("fp16", 2e-3), ("bf16-weights", 2.5e-2)],
                         ids=["bf16", "fp16", "bf16-weights"])
def test_precision_is_same_as_without(gpt, precision, loss_rtol):
    workload, batches, losses, model = gpt
    low_losses, low_model, _ = train(workload, memwise.Recipe(batch_size=8, precision=precision), batches)
    torch.testing.assert_close(low_losses, losses, rtol=loss_rtol, atol=0)
    initial = [param.detach() for param in workload.model.parameters()]
    assert update_cosine(model, low_model, initial) >= 0.99  # measured >= 0.9996


def test_autocast_runs_matmuls_in_low_precision(gpt):
    workload, batches, _, _ = gpt
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        model = copy.deepcopy(workload.model)
        seen = []
        model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, args, output, seen=seen: seen.append(output.dtype))
        runner = StepRunner(workload, memwise.Recipe(batch_size=8, precision=precision), Mode.TRAIN, model, torch.device("cpu"))
        runner.step(batches[0])
        assert seen == [dtype], precision
        assert (runner.scaler is not None) == (precision == "fp16"), "fp16 needs a GradScaler"
        assert all(param.dtype == torch.float32 for param in model.parameters())  # autocast leaves the weights alone
        runner.close()


def test_bf16_weights_keep_bf16_parameters_and_fp32_masters(gpt):
    workload, batches, _, _ = gpt
    model = copy.deepcopy(workload.model)
    parameters = list(model.parameters())
    runner = StepRunner(workload, memwise.Recipe(batch_size=8, precision="bf16-weights"), Mode.TRAIN, model, torch.device("cpu"))
    for batch in batches[:3]:
        runner.step(batch)
        assert all(param.dtype == torch.bfloat16 for param in model.parameters())
    assert isinstance(runner.optimizer, MasterWeightsOptimizer)
    masters = [master for _, master in runner.optimizer.pairs]
    assert all(master.dtype == torch.float32 for master in masters)
    assert {id(param) for param in runner.optimizer.param_groups[0]["params"]} == {id(master) for master in masters}
    assert {id(master) for master in masters} == {id(tensor) for tensor in runner.handle.effects.optimizer_owned}
    for param, master in runner.optimizer.pairs:
        torch.testing.assert_close(param, master.detach().to(torch.bfloat16), rtol=0, atol=0)  # copied back after the step
    runner.close()
    # remove() gives the model its fp32 tensors back, updated by the optimizer: the masters themselves
    assert list(model.parameters()) == parameters
    for param, master in runner.optimizer.pairs:
        assert param.dtype == torch.float32
        assert param.data_ptr() == master.data_ptr()
    assert not any(torch.equal(param, original) for param, original in zip(model.parameters(), workload.model.parameters())
                   if param.numel() > 1)


def test_bf16_weights_cast_float_inputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    handle = memwise.apply_(model, memwise.Recipe(precision="bf16-weights"))
    assert model(torch.randn(4, 8)).dtype == torch.bfloat16
    handle.remove()
    assert model(torch.randn(4, 8)).dtype == torch.float32
