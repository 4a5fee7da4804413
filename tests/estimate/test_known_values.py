"""The fake run takes the branches the real run takes where model code reads tensor values.

transformers skips the explicit attention mask when `attention_mask` is all ones, but asks
`is_tracing(tensor)` first, which is true for fake tensors; without `KnownValues` the fake run
builds and keeps an O(seq^2) mask the real run never allocates. Checked against `profile` with the
peak in backward (no checkpointing, SGD), where the mask would show.
"""

import contextlib

import pytest
import torch

import memwise
from memwise.estimate import fake_run
from memwise.estimate.known_values import KnownValues

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
         "num_key_value_heads": 2, "vocab_size": 256}


def _case(spec: str, seq_len: int) -> tuple[memwise.Workload, memwise.Recipe]:
    pytest.importorskip("transformers", reason="hf workloads need transformers (pip install memwise[hf])")
    args = {**SMALL, "seq_len": seq_len, "max_position_embeddings": seq_len}
    if spec == "hf:mistral":  # no sliding window (as Mistral-7B v0.2+): a 4096 window needs the mask for real
        args["sliding_window"] = 2 * seq_len
    workload = memwise.load_workload(spec, args)
    return workload, memwise.Recipe(batch_size=1, optimizer="sgd")


@pytest.mark.parametrize("seq_len", [2048, pytest.param(4096, marks=pytest.mark.slow)])
@pytest.mark.parametrize("spec", ["hf:llama", "hf:mistral", "hf:qwen2"])
def test_long_sequence_estimate_matches_profile(spec, seq_len):
    workload, recipe = _case(spec, seq_len)
    measured = memwise.profile(workload, recipe, steps=2)
    predicted = memwise.estimate(workload, recipe, "cpu")
    assert measured.phase_at_peak == "backward"
    assert abs(predicted.peak_bytes / measured.peak_bytes - 1) <= 0.01
    assert predicted.by_category["activation"] == measured.by_category["activation"]


def test_without_known_values_the_fake_run_builds_the_mask(monkeypatch):
    """Why the mechanism exists: answering `is_tracing` as a tracer would costs the O(seq^2) mask."""
    workload, recipe = _case("hf:llama", 2048)
    measured = memwise.profile(workload, recipe, steps=2)
    monkeypatch.setattr(fake_run, "real_branches", lambda known: contextlib.nullcontext())
    monkeypatch.setattr(KnownValues, "scalar", lambda self, tensor: None)
    blind = memwise.estimate(workload, recipe, "cpu")
    mask_bytes = 2048 * 2048  # one bool per query/key pair, batch 1
    assert blind.peak_bytes - measured.peak_bytes >= mask_bytes


def test_values_propagate_through_small_ops_only():
    known = KnownValues(max_numel=16)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        small = torch.ones(4, dtype=torch.int64)
        big = torch.ones(64)
    known._twins[small] = torch.ones(4, dtype=torch.int64)
    with mode:
        total = small.sum()
    known.propagate(torch.ops.aten.sum.default, (small,), {}, total, [total])
    assert known.scalar(total) == 4
    with mode:
        doubled = big * 2
    known.propagate(torch.ops.aten.mul.Tensor, (big, 2), {}, doubled, [doubled])
    assert not known.knows(doubled)
