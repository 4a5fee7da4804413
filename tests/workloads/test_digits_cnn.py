import pytest
import torch
import torch.nn.functional as F

from memwise.core.errors import BadInputError
from memwise.core.workload import call_model, loss_from_output
from memwise.workloads.digits_cnn import SimpleCNN, digits_cnn, evaluate, load_digits_split


def _conv_parameters(in_channels: int, out_channels: int, kernel: int) -> int:
    return out_channels * in_channels * kernel * kernel + out_channels


def _linear_parameters(in_features: int, out_features: int) -> int:
    return in_features * out_features + out_features


def test_simple_cnn_parameter_count_matches_architecture():
    expected = (
        _conv_parameters(1, 32, 3)
        + _conv_parameters(32, 64, 3)
        + _linear_parameters(64 * 7 * 7, 128)
        + _linear_parameters(128, 10)
    )
    model = SimpleCNN()
    assert sum(parameter.numel() for parameter in model.parameters()) == expected == 421_642
    assert [name for name, child in model.named_children() if list(child.parameters())] == ["conv1", "conv2", "fc1", "fc2"]


def test_simple_cnn_returns_logits_without_labels_and_cross_entropy_with_them():
    model = SimpleCNN()
    images = torch.randn(5, 1, 28, 28)
    labels = torch.tensor([0, 3, 9, 1, 1])
    logits = model(images)
    assert logits.shape == (5, 10)
    torch.testing.assert_close(model(images, labels), F.cross_entropy(logits, labels), rtol=0, atol=0)


def test_load_digits_split_is_the_fixed_stratified_split_normalized_on_train():
    x_train, y_train, x_test, y_test = load_digits_split()
    assert x_train.shape == (1347, 1, 28, 28) and x_test.shape == (450, 1, 28, 28)
    assert y_train.dtype == torch.int64 and y_test.shape == (450,)
    assert abs(float(x_train.mean())) < 1e-4
    assert abs(float(x_train.std()) - 1.0) < 1e-4
    # Stratified: every class keeps its share in the test split to within one image.
    train_share = torch.bincount(y_train, minlength=10) / len(y_train)
    test_counts = torch.bincount(y_test, minlength=10)
    assert torch.all((test_counts - train_share * len(y_test)).abs() <= 1.0)


def test_make_batch_cycles_through_the_training_split_once_per_epoch():
    workload = digits_cnn(seed=3)
    x_train, y_train, _, _ = load_digits_split()
    assert len(y_train) == 3 * 449
    batches = [workload.make_batch(449) for _ in range(3)]
    images = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    assert torch.equal(torch.bincount(labels, minlength=10), torch.bincount(y_train, minlength=10))
    # Same multiset of images: compare a per-image fingerprint, sorted.
    fingerprint = lambda x: torch.sort((x.flatten(1) * torch.arange(1, 785)).sum(1)).values  # noqa: E731
    torch.testing.assert_close(fingerprint(images), fingerprint(x_train))


def test_make_batch_is_reproducible_for_a_seed_and_differs_across_seeds():
    first_images, first_labels = digits_cnn(seed=1).make_batch(64)
    again_images, again_labels = digits_cnn(seed=1).make_batch(64)
    other_images, _ = digits_cnn(seed=2).make_batch(64)
    assert torch.equal(first_images, again_images) and torch.equal(first_labels, again_labels)
    assert not torch.equal(first_images, other_images)
    assert first_images.shape == (64, 1, 28, 28) and first_labels.shape == (64,)


def test_make_batch_larger_than_the_training_split_samples_with_replacement():
    images, labels = digits_cnn().make_batch(2000)
    assert images.shape == (2000, 1, 28, 28) and labels.shape == (2000,)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_make_batch_rejects_a_bad_batch_size(batch_size):
    with pytest.raises(BadInputError, match="batch_size"):
        digits_cnn().make_batch(batch_size)


def test_workload_step_follows_the_workload_contract():
    workload = digits_cnn()
    batch = workload.make_batch(8)
    loss = loss_from_output(call_model(workload.model, batch), batch, workload.loss_fn)
    assert loss.ndim == 0 and 2.0 < loss.item() < 2.6  # about ln(10) = 2.30 at initialization
    assert workload.name == "digits-cnn" and workload.default_batch_size == 64


def test_building_the_workload_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    digits_cnn(seed=7)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)


def test_evaluate_restores_the_training_mode():
    model = digits_cnn().model
    model.train()
    evaluate(model)
    assert model.training
    model.eval()
    evaluate(model)
    assert not model.training


def test_train_reaches_97_percent_test_accuracy():
    workload = digits_cnn(seed=0)
    untrained_accuracy = workload.evaluate(workload.model)
    epoch_losses = workload.extras["train"](workload.model, epochs=8, batch_size=64, lr=1e-3, seed=0)
    accuracy = workload.evaluate(workload.model)
    assert untrained_accuracy < 0.3
    assert accuracy >= 0.97, f"test accuracy {accuracy:.4f} after training"
    assert len(epoch_losses) == 8 and epoch_losses[-1] < 0.4 * epoch_losses[0]


def test_train_rejects_bad_arguments():
    model = SimpleCNN()
    with pytest.raises(BadInputError, match="epochs"):
        digits_cnn().extras["train"](model, epochs=0)
    with pytest.raises(BadInputError, match="lr"):
        digits_cnn().extras["train"](model, lr=-1.0)
    with pytest.raises(BadInputError, match="label_smoothing"):
        digits_cnn().extras["train"](model, label_smoothing=1.0)
