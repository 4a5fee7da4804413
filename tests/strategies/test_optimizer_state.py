"""Optimizer state in bf16 or 8 bits: AdamW trains as with fp32 moments, and the 8-bit code's error is bounded."""

import copy

import pytest
import torch

import memwise
from memwise.core.errors import BadInputError
from memwise.core.recipe import Mode
from memwise.core.step import StepRunner
from memwise.strategies.master_weights import MasterWeightsOptimizer
from memwise.strategies.optimizer_state import (
    BLOCK,
    LowPrecisionAdam,
    dequantize_signed,
    dequantize_sqrt,
    quantize_signed,
    quantize_sqrt,
)

STEPS = 12
LR = 1e-3  # the built-in AdamW's learning rate


def train(workload, recipe, batches, *, on_step=None):
    """Losses of `recipe` over `batches` from a fresh copy of the workload's model, and the trained copy."""
    torch.manual_seed(0)
    model = copy.deepcopy(workload.model)
    runner = StepRunner(workload, recipe, Mode.TRAIN, model, torch.device("cpu"))
    losses = []
    try:
        for batch in batches:
            before = [param.detach().clone() for param in model.parameters()]
            losses.append(runner.step(batch))
            if on_step is not None:
                on_step(before, list(model.parameters()))
    finally:
        runner.close()
    return losses, model


@pytest.fixture(scope="module")
def gpt():
    workload = memwise.load_workload("gpt", {"preset": "tiny", "n_layer": 2, "seq_len": 32})
    pair = [workload.make_batch(8) for _ in range(2)]
    batches = [pair[step % 2] for step in range(STEPS)]
    losses, model = train(workload, memwise.Recipe(batch_size=8, optimizer="adamw"), batches)
    assert losses[-1] < 0.95 * losses[0]
    return workload, batches, losses, model


# Stated tolerance: the moments are rounded every step (bf16: 8 mantissa bits; 8-bit: 1/254 of a
# block's largest |m|), which moves the loss by ~1e-5 relative over these 12 steps (measured
# 2e-6 bf16, 2e-5 8-bit) while training lowers it by ~10%.
@pytest.mark.parametrize("state_dtype", ["bf16", "8bit"])
def test_optimizer_state_is_same_as_without(gpt, state_dtype):
    workload, batches, losses, model = gpt
    low_losses, low_model = train(workload, memwise.Recipe(batch_size=8, optimizer="adamw", optimizer_state=state_dtype), batches)
    torch.testing.assert_close(low_losses, losses, rtol=1e-3, atol=0)
    initial = [param.detach() for param in workload.model.parameters()]
    updates = [torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(m.parameters(), initial)]) for m in (model, low_model)]
    assert torch.nn.functional.cosine_similarity(*updates, dim=0) >= 0.99  # measured >= 0.999


@pytest.mark.parametrize("state_dtype,dtypes", [
    ("bf16", {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}),
    ("8bit", {"exp_avg_codes": torch.int8, "exp_avg_scale": torch.float32, "exp_avg_sq_codes": torch.uint8, "exp_avg_sq_scale": torch.float32}),
])
def test_optimizer_state_is_stored_compactly(gpt, state_dtype, dtypes):
    workload, batches, _, _ = gpt
    model = copy.deepcopy(workload.model)
    runner = StepRunner(workload, memwise.Recipe(batch_size=8, optimizer_state=state_dtype), Mode.TRAIN, model, torch.device("cpu"))
    runner.step(batches[0])
    assert isinstance(runner.optimizer, LowPrecisionAdam)
    for param in model.parameters():
        state = runner.optimizer.state[param]
        assert {name: value.dtype for name, value in state.items() if isinstance(value, torch.Tensor)} == dtypes
        if state_dtype == "8bit":
            blocks = -(-param.numel() // BLOCK)
            assert state["exp_avg_codes"].numel() == blocks * BLOCK and state["exp_avg_scale"].numel() == blocks
    runner.close()


def test_8bit_state_never_jumps_the_weights():
    """Regression: a second moment read back as 0 next to a nonzero first moment made the update lr*m/eps.

    On the mlp workload a weight moved by 315x the learning rate in the third step and weights
    reached 275 after 150 steps; fp32 AdamW moves no weight by more than ~2x lr per step here.
    """
    workload = memwise.load_workload("mlp", {})
    batches = [workload.make_batch(32) for _ in range(4)] * 5
    largest = []

    def record(before, after):
        largest.append(max((a.detach() - b).abs().max().item() for a, b in zip(after, before)))

    losses, _ = train(workload, memwise.Recipe(batch_size=32, optimizer="adamw", optimizer_state="8bit"), batches, on_step=record)
    assert max(largest) <= 5 * LR, f"a weight moved by {max(largest) / LR:.0f}x lr in one step"
    assert losses[-1] < losses[0]


def test_8bit_composes_with_bf16_weights(gpt):
    """bf16 weights keep fp32 masters whatever holds the moments; the 8-bit Adam steps the masters."""
    workload, batches, _, _ = gpt
    model = copy.deepcopy(workload.model)
    runner = StepRunner(workload, memwise.Recipe(batch_size=8, precision="bf16-weights", optimizer_state="8bit"),
                        Mode.TRAIN, model, torch.device("cpu"))
    runner.step(batches[0])
    assert isinstance(runner.optimizer, MasterWeightsOptimizer)
    assert isinstance(runner.optimizer.inner, LowPrecisionAdam)
    assert all(param.dtype == torch.float32 for param in runner.optimizer.param_groups[0]["params"])
    assert all(param.dtype == torch.bfloat16 for param in model.parameters())
    runner.close()


def test_only_adam_has_moments_to_shrink():
    workload = memwise.load_workload("mlp", {})
    with pytest.raises(BadInputError, match="optimizer_state=8bit.*optimizer=sgd"):
        StepRunner(workload, memwise.Recipe(batch_size=4, optimizer="sgd", optimizer_state="8bit"), Mode.TRAIN,
                   copy.deepcopy(workload.model), torch.device("cpu"))


def sample_values(kind, numel, generator):
    if kind == "normal":
        return torch.randn(numel, generator=generator)
    if kind == "wide":  # magnitudes over ten decades inside one block, as Adam's moments have
        return torch.randn(numel, generator=generator) * 10 ** (torch.rand(numel, generator=generator) * 10 - 8)
    if kind == "zeros":
        return torch.zeros(numel)
    return torch.full((numel,), -3.5)


KINDS = ["normal", "wide", "zeros", "constant"]
SIZES = [1, 255, 256, 1000, 4096]


def block_max(values, reduce_fn=lambda blocks: blocks.abs().amax(dim=1)):
    padded = torch.nn.functional.pad(values.flatten(), (0, (-values.numel()) % BLOCK))
    return reduce_fn(padded.view(-1, BLOCK)).repeat_interleave(BLOCK)[: values.numel()]


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_signed_round_trip_error_is_half_a_step(kind, numel):
    values = sample_values(kind, numel, torch.Generator().manual_seed(numel)).view(numel, 1)  # any shape comes back
    codes, scale = quantize_signed(values)
    assert codes.dtype == torch.int8 and scale.numel() == -(-numel // BLOCK)
    restored = dequantize_signed(codes, scale, values)
    assert restored.shape == values.shape
    # round to nearest of 255 levels in [-blockmax, blockmax]: at most half of blockmax / 127
    bound = block_max(values) / 254 * (1 + 1e-5)
    assert torch.all((restored - values).flatten().abs() <= bound)
    assert torch.all(restored.flatten() * values.flatten() >= 0)  # never flips a sign
    if kind == "zeros":
        assert torch.all(restored == 0)


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_sqrt_round_trip_error_is_bounded_and_never_reads_zero(kind, numel):
    values = sample_values(kind, numel, torch.Generator().manual_seed(numel)).square()
    codes, scale = quantize_sqrt(values)
    assert codes.dtype == torch.uint8
    restored = dequantize_sqrt(codes, scale, values)
    sqrt_max = block_max(values.sqrt(), lambda blocks: blocks.amax(dim=1))
    error = (restored.sqrt() - values.sqrt()).abs()
    step = sqrt_max / 255
    # square roots at least half a step: round to nearest, at most half a step off
    representable = values.sqrt() >= step / 2
    assert torch.all(error[representable] <= step[representable] / 2 * (1 + 1e-5) + 1e-30)
    # smaller positive ones read back as one step (never 0: Adam would divide by eps)
    assert torch.all(restored[values > 0] > 0)
    assert torch.all(error <= step * (1 + 1e-5) + 1e-30)
    assert torch.all(restored[values == 0] == 0)
