"""A stack traced as three blocks gives the same events, bytes and CUDA replay as a full trace."""

import pytest

import memwise
from memwise.core.recipe import Mode
from memwise.core.step import resolve_recipe
from memwise.estimate.block_stack import BlockStack, find_block_stack, stacked_step_log
from memwise.estimate.cuda_allocator import replay_caching_allocator, round_size
from memwise.estimate.fake_run import fake_step_log
from memwise.measure.memory_log import HOST
from memwise.measure.tracker import module_names

LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
         "vocab_size": 300, "seq_len": 16}


def _canonical(events):
    """Events with keys renamed by first appearance, so two traces compare event by event."""
    names = {}
    out = []
    for event in events:
        if event[0] == "alloc":
            out.append(("alloc", names.setdefault(event[1], len(names)), *event[2:]))
        elif event[0] == "free":
            out.append(("free", names.get(event[1], "unknown")))
        elif event[0] == "claim":
            out.append(("claim", event[1], sorted((names.get(key, "unknown"), module or "") for key, module in event[2])))
        else:
            out.append(event)
    return out


def _reserved(log):
    events = [e[:3] if e[0] == "alloc" else e[:2] for e in log.events if e[0] == "free" or (e[0] == "alloc" and e[3] != HOST)]
    return replay_caching_allocator(events).peak_reserved_bytes


CASES = [
    ("gpt", {"preset": "tiny", "n_layer": 6}, {"batch_size": 2}, "cpu"),
    ("gpt", {"preset": "tiny", "n_layer": 7}, {"batch_size": 2, "precision": "bf16", "checkpoint": "full"}, "cuda"),
    ("hf:llama", {**LLAMA, "num_hidden_layers": 6}, {"batch_size": 2, "precision": "bf16"}, "cuda"),
    ("hf:llama", {**LLAMA, "num_hidden_layers": 7}, {"batch_size": 2, "checkpoint": "selective", "optimizer": "sgd"}, "cpu"),
]


@pytest.mark.parametrize("spec,args,recipe_fields,target", CASES, ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_stacked_trace_is_the_full_trace(spec, args, recipe_fields, target):
    if spec.startswith("hf:"):
        pytest.importorskip("transformers", reason="hf workloads need transformers (pip install memwise[hf])")
    workload = memwise.load_workload(spec, args)
    recipe = resolve_recipe(workload, memwise.Recipe(**recipe_fields))
    cuda = target == "cuda"
    options = {"steps": 2, "round_size": round_size if cuda else (lambda nbytes: nbytes), "probe": None,
               "optimizer_foreach": True if cuda else None, "cuda_autocast": cuda, "offload_to_host": cuda}
    stack = find_block_stack(workload.model)
    assert stack is not None and stack.count == args.get("n_layer", args.get("num_hidden_layers"))
    full = fake_step_log(workload, recipe, Mode.TRAIN, **options)
    stacked, how = stacked_step_log(lambda tagger: fake_step_log(workload, recipe, Mode.TRAIN, blocks=tagger, **options),
                                    stack, module_names(workload.model))
    assert stacked is not None, how
    assert _canonical(stacked.events) == _canonical(full.events)
    assert stacked.summarize() == full.summarize()
    if cuda:
        assert _reserved(stacked) == _reserved(full)


def test_estimate_uses_the_stack_and_says_so():
    workload = memwise.load_workload("gpt", {"preset": "tiny", "n_layer": 6})
    result = memwise.estimate(workload, memwise.Recipe(batch_size=2), "cpu")
    assert any("identical blocks in transformer.h" in note for note in result.assumptions)


def test_blocks_that_differ_are_not_a_stack():
    import torch

    blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(7)] + [torch.nn.Linear(4, 8)])
    assert find_block_stack(torch.nn.Sequential(blocks)) is None
    same = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(8)])
    assert find_block_stack(torch.nn.Sequential(same)) == BlockStack(path="0", count=8)
