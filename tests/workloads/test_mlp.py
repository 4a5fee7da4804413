import math

import pytest
import torch
import torch.nn.functional as F

from memwise.core.blocks import find_blocks
from memwise.core.errors import BadInputError
from memwise.core.workload import call_model, loss_from_output
from memwise.workloads.mlp import mlp


@pytest.mark.parametrize(("width", "depth", "in_features", "num_classes"), [(512, 4, 256, 10), (7, 1, 3, 2), (64, 3, 64, 5)])
def test_parameter_count_matches_the_architecture(width, depth, in_features, num_classes):
    expected = (in_features * width + width) + (depth - 1) * (width * width + width) + (width * num_classes + num_classes)
    model = mlp(width=width, depth=depth, in_features=in_features, num_classes=num_classes).model
    assert sum(parameter.numel() for parameter in model.parameters()) == expected


def test_hidden_layers_are_the_blocks():
    model = mlp(depth=5).model
    assert [name for name, _ in find_blocks(model)] == [f"blocks.{index}" for index in range(5)]


def test_forward_returns_cross_entropy_of_the_logits_when_given_labels():
    workload = mlp(width=32, depth=2, in_features=16, num_classes=4)
    x, labels = workload.make_batch(6)
    assert x.shape == (6, 16) and labels.shape == (6,) and int(labels.max()) < 4
    logits = workload.model(x)
    assert logits.shape == (6, 4)
    torch.testing.assert_close(workload.model(x, labels), F.cross_entropy(logits, labels), rtol=0, atol=0)


def test_loss_at_initialization_is_near_chance():
    workload = mlp(seed=0)
    batch = workload.make_batch(512)
    loss = loss_from_output(call_model(workload.model, batch), batch, workload.loss_fn)
    assert abs(loss.item() - math.log(10)) < 0.5


def test_batches_are_reproducible_for_a_seed_and_fresh_on_each_call():
    first = mlp(seed=4).make_batch(8)
    again = mlp(seed=4).make_batch(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    workload = mlp(seed=4)
    workload.make_batch(8)
    assert not torch.equal(workload.make_batch(8)[0], first[0])


@pytest.mark.parametrize("argument", ["width", "depth", "in_features", "num_classes"])
@pytest.mark.parametrize("value", [0, -3, "abc", 2.0])
def test_rejects_a_non_positive_or_non_integer_size(argument, value):
    with pytest.raises(BadInputError, match=argument):
        mlp(**{argument: value})
