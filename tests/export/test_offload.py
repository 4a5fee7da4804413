"""Layer offload: a forward with at most a budget of weights resident, output unchanged."""

import ctypes
import gc

import psutil
import pytest
import torch

from memwise.core.errors import BadInputError
from memwise.export.offload import offload

pytest.importorskip("transformers", reason="the offload test uses hf:gpt2")


def _gpt2():
    from memwise.workloads.hf import hf

    # GPT-2 medium's proportions scaled down for a 2-core CI: 12 layers of width 512 and an 8k
    # vocabulary (170 MB of fp32 weights; the embedding is 10% of them, as in gpt2-medium).
    workload = hf("gpt2", n_embd=512, n_layer=12, n_head=8, vocab_size=8192, seq_len=64)
    batch = workload.make_batch(2)
    batch.pop("labels")
    return workload.model.eval(), batch


def _trimmed_rss():
    """Process RSS after returning free heap memory to the OS (glibc keeps freed blocks otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return psutil.Process().memory_info().rss


@pytest.fixture(scope="module")
def gpt2_run():
    model, batch = _gpt2()
    with torch.no_grad():
        plain = model(**batch).logits
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = weight_bytes // 4
    seen_max = [0]

    def census(*_):  # independent of the handle's counter: sum what the parameters hold right now
        resident = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
        seen_max[0] = max(seen_max[0], sum(resident.values()))

    rss_before = _trimmed_rss()
    handle = offload(model, budget)
    rss_after = _trimmed_rss()
    hooks = [module.register_forward_pre_hook(census) for module in model.modules()]
    hooks += [module.register_forward_hook(census) for module in model.modules()]
    handle.reset_peak()
    with torch.no_grad():
        offloaded = model(**batch).logits
    for hook in hooks:
        hook.remove()
    yield dict(model=model, batch=batch, plain=plain, offloaded=offloaded, handle=handle, budget=budget,
               weight_bytes=weight_bytes, census_max=seen_max[0], rss_drop=rss_before - rss_after)
    handle.remove()


def test_offload_is_same_as_without(gpt2_run):
    torch.testing.assert_close(gpt2_run["offloaded"], gpt2_run["plain"], atol=1e-6, rtol=0)


def test_resident_weights_stay_within_budget_plus_one_block(gpt2_run):
    handle, budget = gpt2_run["handle"], gpt2_run["budget"]
    block_bytes = max(handle.unit_bytes[name] for name in handle.block_names)
    assert handle.resident_weight_bytes_max <= budget + block_bytes
    assert gpt2_run["census_max"] <= budget + block_bytes
    assert gpt2_run["census_max"] == handle.resident_weight_bytes_max  # the counter agrees with the tensors
    # It really streamed: more bytes were read than the budget holds, and most weights left memory.
    assert handle.loaded_bytes > budget
    assert gpt2_run["rss_drop"] > 0.5 * (gpt2_run["weight_bytes"] - budget)


def test_remove_restores_the_plain_model(gpt2_run):
    model, batch = gpt2_run["model"], gpt2_run["batch"]
    gpt2_run["handle"].remove()
    assert all(p.numel() > 0 for p in model.parameters())
    assert not any(module._forward_pre_hooks for module in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, gpt2_run["plain"], atol=0, rtol=0)


def test_budget_smaller_than_the_largest_block_is_rejected_with_its_size():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    block_bytes = (256 * 256 + 256) * 4
    with pytest.raises(BadInputError, match=rf"largest block.*{block_bytes} bytes"):
        offload(model, block_bytes - 1)


def test_bad_where_is_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(BadInputError, match="where"):
        offload(model, 10**6, where="tape")
    with pytest.raises(BadInputError, match="use where='disk'"):
        offload(model, 10**6, where="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offload_from_pinned_memory_is_same_as_without():
    model, batch = _gpt2()
    batch = {name: tensor.cuda() for name, tensor in batch.items()}
    model.cuda()
    with torch.no_grad():
        plain = model(**batch).logits
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.cpu()
    torch.cuda.reset_peak_memory_stats()
    handle = offload(model, weight_bytes // 4, where="cpu", device="cuda")
    with torch.no_grad():
        out = model(**batch).logits
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    block_bytes = max(handle.unit_bytes.values())
    assert handle.resident_weight_bytes_max <= weight_bytes // 4 + block_bytes


def test_cli_run_json_contract_and_small_budget_error():
    import json

    from click.testing import CliRunner

    from memwise.cli.main import main

    runner = CliRunner()
    result = runner.invoke(main, ["run", "digits-cnn", "--budget", "1650KB", "--batch-size", "4", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"peak_bytes", "resident_weight_bytes_max", "latency_ms", "max_abs_diff"} <= set(data)
    assert data["max_abs_diff"] <= 1e-6
    assert data["resident_weight_bytes_max"] <= 1_650_000 < data["weight_bytes"]
    assert data["peak_bytes"] >= data["resident_weight_bytes_max"]
    too_small = runner.invoke(main, ["run", "digits-cnn", "--budget", "100KB"])
    assert too_small.exit_code == 2
    assert "largest block, 'fc1'" in too_small.stderr and "1606144 bytes" in too_small.stderr
