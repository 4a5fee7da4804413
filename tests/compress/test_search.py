"""The compression search: the seed example end to end, the guard, the result contract, bad input."""

import json

import pytest
import torch

import memwise
from memwise.compress import CompressionResult, load_compressed
from memwise.core.errors import BadInputError
from memwise.workloads.digits_cnn import digits_cnn, evaluate
from tests.compress.tiny_workload import tiny

pytest.importorskip("torch_pruning", reason="the seed example prunes with torch-pruning (memwise[compress])")


@pytest.fixture(scope="module")
def digits_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "compressed"
    return memwise.compress(digits_cnn(), 0.01, methods="prune,quantize,distill", out=out, distill_steps=100), out


def test_seed_example_simplecnn_pruned_quantized_saved_reloaded(digits_result):
    """The seed's SimpleCNN wish list: trained, pruned, quantized, evaluated, saved, reloaded, same accuracy."""
    result, out = digits_result
    assert result.feasible
    assert result.original.metric >= 0.97  # the trained model, not the random initialization
    assert 1 / result.size_ratio >= 8  # the issue's target: at least 8x smaller on disk
    assert result.metric_drop <= 0.01
    names = [item.name for item in result.methods]
    assert "prune_structured" in names and any(name.endswith("int8") for name in names)
    reloaded = load_compressed(out)
    assert evaluate(reloaded) == result.compressed.metric == result.reloaded_metric
    assert (out / "model.pt").stat().st_size == result.compressed.size_bytes
    inner = getattr(reloaded, "model", reloaded)
    assert inner.conv2.out_channels < 64 or inner.fc1.out_features < 128  # shapes really pruned
    assert not any(type(module) is torch.nn.Linear for module in reloaded.modules())  # quantized


def test_every_trial_is_a_row_with_flags(digits_result):
    result, _ = digits_result
    assert len(result.trials) >= 3
    for trial in result.trials:
        assert trial.size_bytes > 0 and set(trial.latency_ms) == {"batch_1", "batch_32"}
        assert trial.accepted == (trial.metric_drop <= 0.01 + 1e-9)
        assert ("slower" in trial.flags) == (trial.latency_ms["batch_32"] > trial.original_latency_ms["batch_32"])
        assert ("saves nothing" in trial.flags) == (trial.size_bytes >= result.original.size_bytes)
    best = min((trial for trial in result.trials if trial.accepted), key=lambda trial: trial.size_bytes)
    assert result.compressed.size_bytes <= best.size_bytes * 1.02  # size objective, 2% tie band


def test_report_json_has_the_issue_fields_and_round_trips(digits_result):
    result, out = digits_result
    data = json.loads((out / "report.json").read_text())
    for key in ("original", "compressed", "size_ratio", "metric_drop", "methods", "trials", "path"):
        assert key in data
    for key in ("size_bytes", "metric", "latency_ms"):
        assert key in data["original"] and key in data["compressed"]
    assert {"method", "size_bytes", "latency_ms", "metric", "accepted"} <= set(data["trials"][0])
    assert CompressionResult.from_dict(data) == result
    assert "<table>" in (out / "report.html").read_text()


def test_existing_out_directory_is_refused_without_force(digits_result):
    _, out = digits_result
    with pytest.raises(BadInputError, match="--force"):
        memwise.compress(tiny(), 0.01, methods="quantize", out=out)


def test_dynamic_int8_search_on_a_linear_model(tmp_path):
    result = memwise.compress(tiny(), 0.02, methods="quantize", out=tmp_path / "out")
    assert result.feasible
    assert result.size_ratio < 0.4
    reloaded = load_compressed(tmp_path / "out" / "model.pt")
    assert result.reloaded_metric == result.compressed.metric
    assert any("int8" in item.name for item in result.methods)
    with torch.no_grad():
        x = torch.randn(8, 16)
        torch.testing.assert_close(reloaded(x), reloaded(x))  # runs after reload


def test_no_candidate_meets_the_guard_reports_the_best_and_saves_nothing(tmp_path):
    result = memwise.compress(tiny(never_good_enough=True), 0.01, methods="quantize", out=tmp_path / "out")
    assert not result.feasible
    assert result.path is None and not (tmp_path / "out").exists()
    assert result.trials and not any(trial.accepted for trial in result.trials)


@pytest.mark.parametrize("drop", [-0.1, 1.5, True, "0.1"])
def test_metric_drop_outside_zero_one_is_rejected(drop):
    with pytest.raises(BadInputError, match="max_metric_drop"):
        memwise.compress(tiny(), drop)


def test_bad_methods_and_objective_are_rejected():
    with pytest.raises(BadInputError, match="unknown method 'prune_all'"):
        memwise.compress(tiny(), 0.01, methods="prune_all")
    with pytest.raises(BadInputError, match="objective"):
        memwise.compress(tiny(), 0.01, objective="accuracy")


def test_workload_without_evaluate_says_how_to_provide_one():
    with pytest.raises(BadInputError, match=r"evaluate=fn"):
        memwise.compress(tiny(no_evaluate=True), 0.01)


def test_untrained_weights_are_refused(tmp_path):
    weights = tmp_path / "untrained.pt"
    torch.save(digits_cnn(seed=3).model.state_dict(), weights)
    with pytest.raises(BadInputError, match="chance level"):
        memwise.compress(digits_cnn(), 0.01, weights=weights)


def test_weights_that_do_not_fit_are_refused(tmp_path):
    weights = tmp_path / "other.pt"
    torch.save({"fc1.weight": torch.zeros(3, 3)}, weights)
    with pytest.raises(BadInputError, match="does not fit"):
        memwise.compress(digits_cnn(), 0.01, weights=weights)


def test_absent_optional_package_is_skipped_naming_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_optional(name, *args, **kwargs):
        if name.startswith("torch_pruning") or name.startswith("torchao"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    result = memwise.compress(tiny(), 0.02, methods="prune,quantize", budget_s=30)
    reasons = {item.method: item.reason for item in result.skipped}
    assert "memwise[compress]" in reasons["prune"]
    assert "memwise[compress]" in reasons["quantize:torchao_int8_weight_only"]
    assert result.feasible  # dynamic int8 needs nothing optional
