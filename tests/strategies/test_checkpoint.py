"""Activation checkpointing: the same training as without it, bit for bit, and the right blocks recompute."""

import copy

import pytest
import torch

import memwise
from memwise.core.errors import BadInputError
from memwise.core.recipe import Mode
from memwise.core.step import StepRunner

STEPS = 4


def train(workload, recipe, batches):
    """Losses of `recipe` over `batches` from a fresh copy of the workload's model, and the trained copy."""
    torch.manual_seed(0)  # dropout draws the same masks on both sides
    model = copy.deepcopy(workload.model)
    runner = StepRunner(workload, recipe, Mode.TRAIN, model, torch.device("cpu"))
    try:
        losses = [runner.step(batch) for batch in batches]
    finally:
        runner.close()
    return losses, model


@pytest.fixture(scope="module")
def gpt():
    workload = memwise.load_workload("gpt", {"preset": "tiny", "n_layer": 4, "seq_len": 32})
    batches = [workload.make_batch(4) for _ in range(STEPS)]
    return workload, batches


def assert_bit_exact(workload, batches, **strategy):
    """Non-reentrant checkpointing recomputes the same ops on the same inputs: exactly equal on CPU in fp32."""
    losses, model = train(workload, memwise.Recipe(batch_size=4), batches)
    checkpointed_losses, checkpointed_model = train(workload, memwise.Recipe(batch_size=4, **strategy), batches)
    torch.testing.assert_close(checkpointed_losses, losses, rtol=0, atol=0)
    for (name, param), checkpointed in zip(model.named_parameters(), checkpointed_model.parameters()):
        torch.testing.assert_close(checkpointed, param, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert losses[-1] < losses[0]  # it trained: the comparison is not between two untouched models


def test_checkpoint_full_is_same_as_without(gpt):
    assert_bit_exact(*gpt, checkpoint="full")


def test_checkpoint_selective_is_same_as_without(gpt):
    assert_bit_exact(*gpt, checkpoint="selective")


def test_checkpoint_every_n_is_same_as_without(gpt):
    assert_bit_exact(*gpt, checkpoint="every_n", checkpoint_every_n=3)


def test_checkpoint_keeps_dropout_masks():
    """BERT has dropout in every layer: the recomputation must replay the forward's random masks."""
    pytest.importorskip("transformers", reason="hf workloads need transformers (pip install memwise[hf])")
    workload = memwise.load_workload("hf:bert", {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                                 "num_attention_heads": 2, "seq_len": 32})
    assert workload.model.config.hidden_dropout_prob > 0
    batches = [workload.make_batch(4) for _ in range(3)]
    assert_bit_exact(workload, batches, checkpoint="full")


def forward_calls_per_block(workload, recipe, batch):
    """How many times each block's MLP input projection runs in one training step (2: recomputed in backward)."""
    model = copy.deepcopy(workload.model)
    calls = {}
    for index, block in enumerate(model.transformer.h):
        calls[index] = 0
        block.mlp.c_fc.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    runner = StepRunner(workload, recipe, Mode.TRAIN, model, torch.device("cpu"))
    runner.step(batch)
    runner.close()
    return calls


@pytest.mark.parametrize("strategy,expected", [
    ({}, {0: 1, 1: 1, 2: 1, 3: 1}),
    ({"checkpoint": "full"}, {0: 2, 1: 2, 2: 2, 3: 2}),
    ({"checkpoint": "selective"}, {0: 2, 1: 2, 2: 2, 3: 2}),
    ({"checkpoint": "every_n", "checkpoint_every_n": 2}, {0: 2, 1: 1, 2: 2, 3: 1}),
    ({"checkpoint": "every_n", "checkpoint_every_n": 3}, {0: 2, 1: 1, 2: 1, 3: 2}),
    ({"checkpoint": "selective", "checkpoint_modules": ["transformer.h.1"]}, {0: 1, 1: 2, 2: 1, 3: 1}),
], ids=["none", "full", "selective", "every_2", "every_3", "selective_by_name"])
def test_checkpointed_blocks_recompute_in_backward(gpt, strategy, expected):
    workload, batches = gpt
    assert forward_calls_per_block(workload, memwise.Recipe(batch_size=4, **strategy), batches[0]) == expected


def test_selective_by_class_name_wraps_only_that_class(gpt):
    workload = gpt[0]
    model = copy.deepcopy(workload.model)
    handle = memwise.apply_(model, memwise.Recipe(batch_size=4, checkpoint="selective", checkpoint_modules=["MLP"]))
    wrapped = sorted(name for name, module in model.named_modules() if "forward" in module.__dict__)
    handle.remove()
    assert wrapped == [f"transformer.h.{index}.mlp" for index in range(4)]


def test_unknown_checkpoint_module_is_an_error_that_leaves_the_model_alone(gpt):
    workload = gpt[0]
    model = copy.deepcopy(workload.model)
    recipe = memwise.Recipe(batch_size=4, precision="bf16-weights", checkpoint="selective", checkpoint_modules=["NoSuchBlock"])
    with pytest.raises(BadInputError, match="checkpoint_modules.*NoSuchBlock"):
        memwise.apply_(model, recipe)
    # bf16-weights was applied before checkpointing failed, and must have been undone
    assert all(param.dtype == torch.float32 for param in model.parameters())
    assert not model._forward_pre_hooks
    for (name, param), original in zip(model.named_parameters(), workload.model.parameters()):
        torch.testing.assert_close(param, original, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
