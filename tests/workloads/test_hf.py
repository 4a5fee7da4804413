import math
import time

import pytest
import torch

pytest.importorskip("transformers", reason="hf workloads need transformers (pip install 'memwise[hf]')")

from memwise.core.blocks import find_blocks  # noqa: E402
from memwise.core.errors import WorkloadError  # noqa: E402
from memwise.core.workload import call_model, loss_from_output  # noqa: E402
from memwise.workloads.hf import hf  # noqa: E402
from memwise.workloads.registry import load_workload  # noqa: E402

SMALL_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000
)


def _step_loss(workload, batch_size=2):
    batch = workload.make_batch(batch_size)
    return loss_from_output(call_model(workload.model, batch), batch, workload.loss_fn)


def test_bert_with_two_layers_is_a_masked_lm_with_a_scalar_loss():
    workload = load_workload("hf:bert", {"num_hidden_layers": 2})
    assert workload.name == "hf:bert" and workload.extras["task"] == "masked-lm"
    assert len(find_blocks(workload.model)) == 2
    assert workload.model.config._attn_implementation == "sdpa"
    batch = workload.make_batch(2)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 128) and int(batch["input_ids"].max()) < 30522
    loss = _step_loss(workload)
    assert loss.ndim == 0
    assert abs(loss.item() - math.log(30522)) < 1.0  # random weights: close to uniform


def test_gpt2_with_two_layers_is_a_causal_lm():
    workload = load_workload("hf:gpt2", {"n_layer": 2})
    assert workload.extras["task"] == "causal-lm"
    assert [name for name, _ in find_blocks(workload.model)] == ["transformer.h.0", "transformer.h.1"]
    loss = _step_loss(workload)
    assert abs(loss.item() - math.log(50257)) < 1.0


def test_small_llama_has_the_parameters_of_its_shape():
    workload = load_workload("hf:llama", SMALL_LLAMA)
    hidden, intermediate, layers, vocab = 64, 128, 2, 1000
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden  # q,k,v,o; gate,up,down; 2 RMSNorms
    expected = vocab * hidden + layers * per_layer + hidden + vocab * hidden  # untied lm_head
    assert sum(parameter.numel() for parameter in workload.model.parameters()) == expected
    loss = _step_loss(workload)
    loss.backward()
    assert abs(loss.item() - math.log(1000)) < 1.0
    assert all(parameter.grad is not None for parameter in workload.model.parameters())


def test_meta_build_of_a_7b_llama_is_fast_and_allocates_no_storage():
    start = time.perf_counter()
    workload = hf(
        "llama",
        device="meta",
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    build_s = time.perf_counter() - start
    parameters = list(workload.model.parameters())
    assert build_s < 10.0
    assert all(parameter.is_meta for parameter in parameters)
    assert sum(parameter.numel() for parameter in parameters) == 6_738_415_616  # LLaMA-7B
    assert workload.make_batch(1)["input_ids"].device.type == "cpu"


def test_base_task_loss_is_the_mean_of_the_last_hidden_state():
    workload = hf("bert", task="base", num_hidden_layers=1, seq_len=16)
    batch = workload.make_batch(2)
    assert "labels" not in batch
    output = call_model(workload.model, batch)
    torch.testing.assert_close(workload.loss_fn(output, batch), output.last_hidden_state.mean())


def test_architecture_without_sdpa_falls_back_to_its_default_attention():
    workload = hf("xlnet", d_model=64, n_head=2, d_inner=128, n_layer=1, vocab_size=100, seq_len=16)
    assert workload.model.config._attn_implementation == "eager"
    assert _step_loss(workload).ndim == 0


def test_seq_len_defaults_to_128_capped_by_max_positions():
    assert hf("gpt2", n_layer=1, n_positions=64, vocab_size=100).extras["seq_len"] == 64
    assert hf("gpt2", n_layer=1, vocab_size=100).extras["seq_len"] == 128
    assert hf("gpt2", n_layer=1, vocab_size=100, seq_len=32).make_batch(3)["input_ids"].shape == (3, 32)


def test_same_seed_gives_the_same_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    first = hf("llama", seed=3, **SMALL_LLAMA).model
    torch.testing.assert_close(torch.rand(2), expected, rtol=0, atol=0)
    second = hf("llama", seed=3, **SMALL_LLAMA).model
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_unknown_model_type_lists_valid_ones():
    with pytest.raises(WorkloadError, match=r"unknown transformers model type 'bertt'; did you mean bert.*gpt2, llama"):
        load_workload("hf:bertt")


def test_unknown_config_key_is_named_with_the_valid_keys():
    with pytest.raises(WorkloadError, match=r"unknown config key 'num_layers'; valid keys are .*num_hidden_layers"):
        hf("bert", num_layers=2)


def test_config_value_of_the_wrong_type_is_rejected():
    with pytest.raises(WorkloadError, match=r"num_hidden_layers='abc' should be of type int"):
        load_workload("hf:bert", {"num_hidden_layers": "abc"})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"seq_len": 1000}, "seq_len=1000 exceeds max_position_embeddings=512"),
        ({"seq_len": "long"}, "seq_len"),
        ({"task": "classify"}, "valid tasks are auto"),
        ({"task": "causal-lm", "device": "not-a-device"}, "device"),
    ],
)
def test_bad_memwise_arguments_are_named(arguments, message):
    with pytest.raises(WorkloadError, match=message):
        hf("bert", num_hidden_layers=1, **arguments)


def test_model_type_without_text_input_is_rejected():
    with pytest.raises(WorkloadError, match="only text models"):
        hf("vit")
