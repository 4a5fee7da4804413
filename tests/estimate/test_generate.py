"""Generation memory: the fake-tensor estimate of `model.generate` against a real measured run."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from memwise.core.errors import BadInputError
from memwise.estimate.generate import estimate_generation
from memwise.measure.generate import GenerationMemory, GenerationShape, profile_generation

pytest.importorskip("transformers", reason="generation needs transformers (memwise[hf])")

LLAMA_STYLE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,  # GQA: 2 KV heads for 4
                   intermediate_size=128, vocab_size=1024, max_position_embeddings=512)
ARCHITECTURES = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1024, n_positions=512),
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
}
CONTEXT_LENGTHS = (8, 48, 160)


def _workload(model_type, device="cpu"):
    from memwise.workloads.hf import hf

    return hf(model_type, device=device, **ARCHITECTURES[model_type])


@pytest.fixture(scope="module")
def workloads():
    return {model_type: _workload(model_type) for model_type in ARCHITECTURES}


@pytest.mark.parametrize("context_length", CONTEXT_LENGTHS)
@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_estimate_is_within_2_percent_of_a_real_generate(workloads, model_type, context_length):
    shape = GenerationShape(batch_size=2, context_length=context_length, new_tokens=2,
                            cache="static" if context_length == CONTEXT_LENGTHS[1] else "dynamic")
    measured = profile_generation(workloads[model_type], shape)
    estimated = estimate_generation(workloads[model_type], shape, what_ifs=False)
    assert abs(estimated.peak_bytes / measured.peak_bytes - 1) <= 0.02
    assert estimated.weight_bytes == measured.weight_bytes
    # The peak is more than weights plus the formula's cache: the anchor leaves out activations and logits.
    assert measured.peak_bytes > measured.weight_bytes + measured.kv_cache_bytes


def test_kv_cache_layout_counts_grouped_query_heads(workloads):
    llama = estimate_generation(workloads["llama"], GenerationShape(batch_size=1, context_length=8, new_tokens=2), what_ifs=False)
    gpt2 = estimate_generation(workloads["gpt2"], GenerationShape(batch_size=1, context_length=8, new_tokens=2), what_ifs=False)
    assert (llama.layout.kv_heads, llama.layout.head_dim) == (2, 16)  # 4 query heads share 2 KV heads
    assert (gpt2.layout.kv_heads, gpt2.layout.head_dim) == (4, 16)
    assert llama.kv_cache_bytes_per_token * 2 == gpt2.kv_cache_bytes_per_token


def test_what_ifs_and_max_batch_size_on_a_meta_model():
    workload = _workload("llama", device="meta")  # nothing allocated: the estimate needs no weights
    shape = GenerationShape(batch_size=4, context_length=32, new_tokens=2)
    base = estimate_generation(workload, shape, what_ifs=False)
    budget = base.peak_bytes + (base.peak_bytes - base.weight_bytes)  # room for about twice the sequences
    result = estimate_generation(workload, shape, budget_bytes=budget)
    changes = {item.change: item for item in result.what_ifs}
    assert {"KV cache in bf16", "KV cache in int8", "static cache", "context 16", "batch 2"} <= set(changes)
    assert changes["KV cache in int8"].peak_bytes < changes["KV cache in bf16"].peak_bytes < result.peak_bytes
    assert changes["batch 2"].peak_bytes < result.peak_bytes and changes["context 16"].peak_bytes < result.peak_bytes
    assert result.fits and result.max_batch_size >= 4
    # max_batch_size is the largest batch that fits: one more does not.
    over = estimate_generation(workload, dataclasses.replace(shape, batch_size=result.max_batch_size + 1), what_ifs=False)
    assert budget < over.peak_bytes
    assert GenerationMemory.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_non_causal_models_and_bad_shapes_are_rejected():
    import memwise

    with pytest.raises(BadInputError, match="not a Hugging Face causal LM"):
        estimate_generation(memwise.Workload(torch.nn.Linear(2, 2), lambda n: torch.randn(n, 2), name="linear"),
                            GenerationShape(batch_size=1, context_length=4, new_tokens=1))
    with pytest.raises(BadInputError, match="new_tokens"):
        GenerationShape(batch_size=1, context_length=4, new_tokens=0)
    with pytest.raises(BadInputError, match="cache"):
        GenerationShape(batch_size=1, context_length=4, new_tokens=1, cache="paged")


def test_cli_estimate_and_profile_in_generate_mode():
    from memwise.cli.main import main

    args = [f"--arg={key}={value}" for key, value in ARCHITECTURES["qwen2"].items()]
    common = ["--mode", "generate", "--batch-size", "2", "--context-length", "16", "--new-tokens", "2", "--format", "json"]
    estimated = CliRunner().invoke(main, ["estimate", "hf:qwen2", *args, *common, "--kv-cache-dtype", "int8", "--budget", "2MB"])
    assert estimated.exit_code == 0, estimated.output
    data = json.loads(estimated.stdout)
    assert data["mode"] == "generate" and data["source"] == "estimated" and data["kv_cache_dtype"] == "int8"
    assert data["max_batch_size"] >= 2 and data["fits"] is True
    measured = CliRunner().invoke(main, ["profile", "hf:qwen2", *args, *common])
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.stdout)["source"] == "measured"
