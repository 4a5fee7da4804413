"""`profile` against an independent reference: a plain torch.profiler pass with no memwise hooks."""

import pytest
import torch

import memwise
from memwise.core.errors import BadInputError

# The acceptance grid: peak within 1% of the reference, train and infer, fp32 and bf16.
GRID_WORKLOADS = [
    ("digits-cnn", {}, 32),
    ("mlp", {}, 32),
    ("gpt", {"preset": "tiny"}, 4),
    ("hf:bert", {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "seq_len": 64}, 4),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("spec,args,batch_size", GRID_WORKLOADS, ids=[w[0] for w in GRID_WORKLOADS])
def test_peak_matches_profiler_reference(spec, args, batch_size, mode, precision):
    if spec.startswith("hf:"):
        pytest.importorskip("transformers", reason="hf workloads need transformers (pip install memwise[hf])")
    workload = memwise.load_workload(spec, args)
    result = memwise.profile(workload, memwise.Recipe(batch_size=batch_size, precision=precision), mode=mode, steps=2, verify=True)
    assert result.reference_peak_bytes is not None
    assert abs(result.peak_bytes / result.reference_peak_bytes - 1) <= 0.01
    assert sum(result.by_category.values()) == result.peak_bytes
    param_bytes = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    assert result.by_category["param"] == param_bytes


def test_categories_of_an_adam_step_are_exact(tiny_workload):
    result = memwise.profile(tiny_workload, memwise.Recipe(batch_size=16, optimizer="adam"), steps=3)
    params = list(tiny_workload.model.parameters())
    param_bytes = sum(p.numel() * 4 for p in params)
    assert result.baseline_bytes == param_bytes
    assert result.by_category["param"] == param_bytes
    if result.phase_at_peak == "optimizer":
        # exp_avg and exp_avg_sq per parameter, plus a 4-byte step counter tensor each
        assert result.by_category["optimizer_state"] == 2 * param_bytes + 4 * len(params)
        assert result.by_category["grad"] == param_bytes
    modules = {m.module: m for m in result.by_module}
    assert modules["fc1"].param_bytes == (32 * 64 + 64) * 4
    assert modules["(root)"].param_bytes == param_bytes


def test_activations_scale_with_batch(tiny_workload):
    small = memwise.profile(tiny_workload, memwise.Recipe(batch_size=64), mode="infer", steps=1)
    large = memwise.profile(tiny_workload, memwise.Recipe(batch_size=256), mode="infer", steps=1)
    # fc1's output (batch x 64 floats) is alive when fc1 returns: the dominant activation
    assert large.by_category["activation"] - small.by_category["activation"] >= (256 - 64) * 64 * 4
    assert large.peak_bytes > small.peak_bytes


def test_profile_is_repeatable_and_leaves_the_model_alone(tiny_workload):
    before = {name: value.clone() for name, value in tiny_workload.model.state_dict().items()}
    first = memwise.profile(tiny_workload, memwise.Recipe(batch_size=8), steps=2)
    second = memwise.profile(tiny_workload, memwise.Recipe(batch_size=8), steps=5)
    assert first.peak_bytes == second.peak_bytes
    assert first.by_category == second.by_category
    for name, value in tiny_workload.model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def test_transformer_encoder_fast_path_is_counted():
    """nn.TransformerEncoder inference runs a fused kernel whose intermediates a tensor census misses."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    workload = memwise.Workload(model, lambda b: torch.randn(b, 32, 64), loss_fn=lambda out, batch: out.mean(), name="encoder")
    result = memwise.profile(workload, memwise.Recipe(batch_size=8), mode="infer", steps=1, verify=True)
    assert result.peak_bytes == result.reference_peak_bytes
    assert result.by_category["temporary"] > 0  # the fused kernel's scratch is seen, as temporary


def test_timeline_peak_is_the_peak(tiny_workload):
    result = memwise.profile(tiny_workload, memwise.Recipe(batch_size=32), steps=2)
    timeline = result.timeline
    totals = [sum(series[i] for series in timeline.bytes_by_category.values()) for i in range(len(timeline.x))]
    assert totals[timeline.peak_index] == result.peak_bytes == max(totals)
    assert timeline.x_unit == "ms"
    assert list(timeline.x) == sorted(timeline.x)


def test_profile_json_round_trip(tiny_workload):
    result = memwise.profile(tiny_workload, memwise.Recipe(batch_size=4), steps=1)
    assert memwise.Profile.from_dict(result.to_dict()) == result


@pytest.mark.parametrize(
    "kwargs,match",
    [({"steps": 0}, "steps"), ({"mode": "eval"}, "mode"), ({"device": "tpu"}, "device")],
)
def test_bad_arguments_name_themselves(tiny_workload, kwargs, match):
    with pytest.raises(BadInputError, match=match):
        memwise.profile(tiny_workload, memwise.Recipe(batch_size=4), **kwargs)


def test_bad_batch_size_is_rejected():
    with pytest.raises(BadInputError, match="batch_size"):
        memwise.Recipe(batch_size=0)
