"""`estimate` never allocates a model's weights: workloads are built with parameters on the meta device."""

import subprocess
import sys
import textwrap

import pytest
import torch

import memwise
from memwise.workloads import load_workload
from memwise.workloads.meta_build import META_NOTE, parameters_on_meta

# The 7B Llama of the issue, without device=meta: 6.7e9 parameters, 27 GB of fp32 weights.
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, seq_len=2048)
SHORT = 128  # the sequence does not change the weights; a shorter one keeps the test quick

USER_FACTORY = '''
import torch
import memwise


class Big(torch.nn.Module):
    """1 GiB of fp32 weights, initialized the way people write it: randn and explicit init calls."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8192, 8192, bias=False) for _ in range(3))
        self.scale = torch.nn.Parameter(torch.randn(8192, 8192))  # allocated, filled, then moved
        for layer in self.layers:
            torch.nn.init.normal_(layer.weight, std=0.02)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x @ self.scale


def make():
    return memwise.Workload(Big(), lambda batch_size: torch.randn(batch_size, 8192),
                            loss_fn=lambda out, batch: out.mean(), name="big", default_batch_size=2)


def probes_its_output():
    model = torch.nn.Linear(64, 64)
    width = model(torch.zeros(1, 64)).shape[1]  # a forward pass at build time cannot run on meta
    return memwise.Workload(model, lambda batch_size: torch.randn(batch_size, width), loss_fn=lambda o, b: o.mean())
'''


def _peak_rss_growth(body: str) -> tuple[int, str]:
    """Runs `body` in a fresh interpreter; returns its peak RSS growth in bytes (after imports) and its stdout."""
    script = textwrap.dedent("""
        import resource, sys
        import torch, memwise, memwise.estimate.estimator, memwise.workloads.meta_build
        from memwise.workloads import load_workload
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    """) + textwrap.dedent(body) + textwrap.dedent("""
        print("GROWTH", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return int(lines[-1].split()[1]), "\n".join(lines[:-1])


@pytest.mark.integration
@pytest.mark.slow
def test_7b_llama_is_estimated_without_allocating_its_weights():
    pytest.importorskip("transformers", reason="hf workloads need transformers")
    growth, out = _peak_rss_growth(f"""
        import transformers.models.llama.modeling_llama  # the model's code is not its weights
        workload = load_workload("hf:llama", {dict(LLAMA_7B, seq_len=SHORT)!r}, materialize=False)
        result = memwise.estimate(workload, memwise.Recipe(batch_size=1, precision="bf16", optimizer="sgd"), "H100-80GB", what_if=False)
        params = sum(p.numel() for p in workload.model.parameters())
        print(params, result.by_category["param"], {{p.device.type for p in workload.model.parameters()}}, repr(result.assumptions[-1]))
    """)
    params, param_bytes, devices, note = out.splitlines()[-1].split(" ", 3)
    assert int(params) == 6_738_415_616  # Llama-2-7B's count: the config is the issue's
    assert int(param_bytes) == int(params) * 4  # fp32 weights, estimated (512-byte blocks: sizes are multiples)
    assert devices == "{'meta'}" and note == repr(META_NOTE)
    assert growth < 2**30, f"peak RSS grew by {growth / 2**30:.2f} GiB against 27 GB of weights"


def test_a_user_factory_that_fills_its_weights_is_estimated_without_allocating(tmp_path):
    path = tmp_path / "big.py"
    path.write_text(USER_FACTORY)
    growth, out = _peak_rss_growth(f"""
        workload = load_workload({str(path) + ":make"!r}, materialize=False)
        result = memwise.estimate(workload, memwise.Recipe(batch_size=2, optimizer="sgd"), "cpu", what_if=False)
        print(result.by_category["param"], {{p.device.type for p in workload.model.parameters()}})
    """)
    param_bytes, devices = out.splitlines()[-1].split(" ", 1)
    assert int(param_bytes) == 4 * 8192 * 8192 * 4 and devices == "{'meta'}"
    # 1 GiB of weights (plus 1 GiB of gradients) were never made; only `scale` (256 MiB) existed
    # for a moment, between randn and its registration
    assert growth < 2**30 * 0.4, f"peak RSS grew by {growth / 2**20:.0f} MiB"


def test_a_factory_that_cannot_build_on_meta_is_built_for_real_and_says_why(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(USER_FACTORY)
    workload = load_workload(f"{path}:probes_its_output", materialize=False)
    assert all(param.device.type == "cpu" for param in workload.model.parameters())
    (how,) = workload.extras["assumptions"]
    assert how.startswith("the workload could not be built with its parameters on the meta device (")
    assert "meta" in how.split("(", 1)[1] and how.endswith("it was built with real weights, which this process allocated")
    estimate = memwise.estimate(workload, memwise.Recipe(batch_size=2), "cpu")
    assert how in estimate.assumptions


@pytest.mark.parametrize("spec,args", [("mlp", {"width": 64, "depth": 2}), ("gpt", {"preset": "tiny"}), ("digits-cnn", {})])
def test_meta_built_workloads_estimate_the_same_bytes(spec, args):
    recipe = memwise.Recipe(batch_size=4, optimizer="sgd")
    built_on_meta = load_workload(spec, args, materialize=False)
    assert {param.device.type for param in built_on_meta.model.parameters()} == {"meta"}
    real = load_workload(spec, args)
    assert {param.device.type for param in real.model.parameters()} == {"cpu"}
    on_meta = memwise.estimate(built_on_meta, recipe, "cpu")
    assert on_meta.peak_bytes == memwise.estimate(real, recipe, "cpu").peak_bytes
    assert META_NOTE in on_meta.assumptions


def test_parameters_on_meta_keeps_parameter_attributes_and_buffers():
    with parameters_on_meta():
        norm = torch.nn.BatchNorm1d(4)
        frozen = torch.nn.Linear(3, 3)
        frozen.weight.requires_grad_(False)
        tagged = torch.nn.Parameter(torch.ones(2), requires_grad=False)
        tagged.custom_tag = "kept"
        frozen.extra = tagged
    assert norm.weight.device.type == "meta" and norm.running_mean.device.type == "cpu"  # buffers stay real
    assert not frozen.weight.requires_grad and frozen.weight.device.type == "meta"
    assert frozen.extra.custom_tag == "kept" and not frozen.extra.requires_grad
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the patch ends with the block


def test_profile_refuses_a_model_without_weights():
    workload = load_workload("mlp", {"width": 8, "depth": 1}, materialize=False)
    with pytest.raises(memwise.core.errors.BadInputError, match="parameters are on the meta device.*use estimate"):
        memwise.profile(workload, memwise.Recipe(batch_size=2))
