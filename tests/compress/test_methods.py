"""Each compression method on the trained digits SimpleCNN (or a small module), with measured numbers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memwise.compress import distill as distill_module
from memwise.compress import prune_unstructured, quantize
from memwise.compress.load import deserialize, pack_sparse, saved_size_bytes, serialize
from memwise.core.errors import BadInputError
from memwise.workloads.digits_cnn import evaluate, load_digits_split, trained_model


@pytest.fixture(scope="module")
def trained():
    model = trained_model(seed=0)
    return model, evaluate(model)


def _calibration(count=4, batch_size=64):
    x_train, _, _, _ = load_digits_split()
    return [x_train[index * batch_size:(index + 1) * batch_size] for index in range(count)]


def test_trained_model_is_trained_and_cached(trained, tmp_path):
    model, accuracy = trained
    assert accuracy >= 0.97
    # The cache returns the very same weights as the first call.
    again = trained_model(seed=0)
    for (name, value), (_, other) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(value, other, rtol=0, atol=0, msg=name)


def test_static_int8_shrinks_conv_net_4x_and_keeps_accuracy(trained):
    model, accuracy = trained
    calibration = _calibration()
    quantized = quantize.quantize_static_int8(model, calibration, calibration[0])
    assert type(quantized.model.conv1).__module__.startswith("torch.ao.nn.quantized")
    ratio = saved_size_bytes(quantized) / saved_size_bytes(model)
    assert ratio < 0.3  # int8 weights: a quarter of fp32 plus scales and pickling
    assert accuracy - evaluate(quantized) <= 0.02
    reloaded = deserialize(serialize(quantized))
    assert evaluate(reloaded) == evaluate(quantized)


def test_dynamic_int8_replaces_linear_layers_and_stays_close():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    quantized = quantize.quantize_dynamic_int8(model)
    assert all(type(module) is not nn.Linear for module in quantized.modules())
    assert isinstance(quantized[0], quantize.FullRangeDynamicLinear)
    x = torch.randn(32, 64)
    with torch.no_grad():
        cosine = F.cosine_similarity(quantized(x), model(x), dim=1)
    assert float(cosine.min()) > 0.99
    assert saved_size_bytes(quantized) < 0.4 * saved_size_bytes(model)


def test_per_token_activation_scales_beat_one_scale_per_batch_on_an_outlier_row():
    """Why Int8DynamicLinear exists: one outlier token coarsens every other token's quantization."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 128).eval()
    x = torch.randn(64, 128)
    x[0] *= 100.0  # one outlier token
    with torch.no_grad():
        exact = linear(x)
        per_token = quantize.Int8DynamicLinear.from_float(linear)(x)
        per_batch = quantize.quantize_dynamic_int8(nn.Sequential(linear), full_range=True)(x)
    error_per_token = (per_token[1:] - exact[1:]).abs().mean()
    error_per_batch = (per_batch[1:] - exact[1:]).abs().mean()
    assert error_per_token * 5 < error_per_batch


def test_int8_embedding_error_is_within_half_a_step_per_row():
    torch.manual_seed(0)
    embedding = nn.Embedding(1000, 64)
    quantized = quantize.Int8Embedding.from_float(embedding)
    indices = torch.arange(1000)
    with torch.no_grad():
        error = (quantized(indices) - embedding(indices)).abs().amax(dim=1)
    step = embedding.weight.detach().abs().amax(dim=1) / 127
    assert bool((error <= step / 2 + 1e-7).all())
    ratio = saved_size_bytes(quantized) / saved_size_bytes(embedding)
    assert 0.25 < ratio < 0.30  # int8 rows plus one fp32 scale per 64 values


def test_structured_pruning_removes_channels_and_shrinks_the_file(trained):
    pytest.importorskip("torch_pruning", reason="structured pruning needs torch-pruning (memwise[compress])")
    from memwise.compress import prune_structured

    model, _ = trained
    example = _calibration(1, 2)[0]
    pruned = prune_structured.prune_structured(model, example, {"conv2": 0.5, "fc1": 0.5})
    assert pruned.conv2.out_channels == 32
    assert pruned.fc1.in_features == 32 * 7 * 7
    assert pruned.fc1.out_features == 64
    assert pruned(example).shape == (2, 10)
    assert saved_size_bytes(pruned) < 0.3 * saved_size_bytes(model)
    reloaded = deserialize(serialize(pruned))
    assert reloaded.conv2.out_channels == 32
    torch.testing.assert_close(reloaded(example), pruned(example), rtol=0, atol=0)


def test_sensitivity_scan_measures_each_layer_alone(trained):
    pytest.importorskip("torch_pruning", reason="structured pruning needs torch-pruning (memwise[compress])")
    from memwise.compress import prune_structured

    model, accuracy = trained
    example = _calibration(1, 2)[0]
    layers = prune_structured.candidate_layers(model, example)
    assert layers == ["conv1", "conv2", "fc1"]  # fc2 would change the output shape
    scan = prune_structured.sensitivity_scan(model, example, evaluate, ["fc1"], ratios=(0.5,))
    expected = accuracy - evaluate(prune_structured.prune_structured(model, example, {"fc1": 0.5}))
    assert scan[0].drop_by_ratio[0.5] == pytest.approx(expected)
    assert prune_structured.ratios_from_scan(scan, tolerated_drop=expected) == {"fc1": 0.5}
    if expected > 0:  # a tolerance just below the measured drop excludes the ratio
        assert prune_structured.ratios_from_scan(scan, tolerated_drop=expected - 1e-9) == {}


def test_magnitude_pruning_is_permanent_and_stored_sparse_only_where_smaller(trained):
    model, _ = trained
    pruned = prune_unstructured.prune_magnitude(model, 0.9)
    assert not any(name.endswith("_mask") or name.endswith("_orig") for name, _ in pruned.named_parameters())
    assert prune_unstructured.zero_fraction(pruned) == pytest.approx(0.9, abs=0.001)
    dense_bytes = saved_size_bytes(pruned)
    sparse_bytes = saved_size_bytes(pruned, sparse=True)
    assert sparse_bytes < 0.25 * dense_bytes
    # A weight at 10% sparsity is larger as CSR than dense: it stays dense.
    assert pack_sparse(prune_unstructured.prune_magnitude(nn.Linear(64, 64), 0.1).weight.detach()) is None
    reloaded = deserialize(serialize(pruned, sparse=True))
    for (name, value), (_, other) in zip(pruned.state_dict().items(), reloaded.state_dict().items()):
        torch.testing.assert_close(value, other, rtol=0, atol=0, msg=name)


def test_distillation_loss_is_hinton_kl_plus_cross_entropy():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 10), torch.randn(8, 10), torch.randint(10, (8,))
    loss = distill_module.distillation_loss(student, teacher, labels, temperature=4.0, alpha=0.7)
    p_teacher = F.softmax(teacher / 4, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / 4, dim=1))).sum(dim=1).mean() * 16
    torch.testing.assert_close(loss, 0.7 * kl + 0.3 * F.cross_entropy(student, labels))


def test_distillation_recovers_a_pruned_model(trained):
    model, accuracy = trained
    damaged = prune_unstructured.prune_magnitude(model, 0.95)
    before = evaluate(damaged)
    x_train, y_train, _, _ = load_digits_split()
    generator = torch.Generator().manual_seed(0)

    def make_labeled(batch_size):
        index = torch.randint(len(y_train), (batch_size,), generator=generator)
        return x_train[index], y_train[index]

    recovered = prune_unstructured.prune_magnitude(
        model, 0.95, recover=lambda student: distill_module.distill(student, model, make_labeled, steps=15)
    )
    assert prune_unstructured.zero_fraction(recovered) == pytest.approx(0.95, abs=0.001)  # masks held
    assert evaluate(recovered) > before


def test_torchao_weight_only_int8_or_a_reason():
    pytest.importorskip("torchao", reason="torchao weight-only quantization needs torchao (memwise[compress])")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256)).eval()
    quantized = quantize.quantize_torchao_weight_only(model, bits=8)
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert float(F.cosine_similarity(quantized(x), model(x)).min()) > 0.999
    assert saved_size_bytes(quantized) < 0.35 * saved_size_bytes(model)
    with pytest.raises(quantize.MethodSkipped, match="int4"):
        quantize.quantize_torchao_weight_only(copy.deepcopy(model), bits=4)  # no CPU int4 kernel in this torchao


def test_load_refuses_files_that_are_not_compressed_models(tmp_path):
    from memwise.compress import load_compressed

    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(BadInputError, match="not a memwise compressed model"):
        load_compressed(plain)
    with pytest.raises(BadInputError, match="does not exist"):
        load_compressed(tmp_path / "missing")
