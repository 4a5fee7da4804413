"""`apply_(model, recipe).remove()` puts the model back exactly as it was, for any recipe."""

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memwise
from memwise.core.errors import BadInputError


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.norm = torch.nn.BatchNorm1d(width)  # float and int64 buffers

    def forward(self, x):
        return x + self.norm(torch.relu(self.linear(x)))


class Net(torch.nn.Module):
    """Blocks with buffers, a tied weight, a user's forward hooks and an instance-level `forward`."""

    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(width, width, bias=False)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, width, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.ones(width))
        self.blocks[1].forward = functools.partial(Block.forward, self.blocks[1])  # e.g. set by another library
        self.blocks[2].register_forward_hook(lambda module, args, output: output)
        self.register_forward_pre_hook(lambda module, args: args)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x) * self.scale


def snapshot(model):
    """Everything `apply_` may touch, with object identities where identity matters."""
    hook_dicts = [name for name in vars(torch.nn.Module()) if name.endswith("hooks") or "hooks_" in name]
    return {
        "parameters": [(name, param, param.dtype, param.data_ptr(), param.detach().clone(), param.requires_grad)
                       for name, param in model.named_parameters(remove_duplicate=False)],
        "buffers": [(name, buffer, buffer.dtype, buffer.clone()) for name, buffer in model.named_buffers(remove_duplicate=False)],
        "forward": [(name, module.__dict__.get("forward", "<class forward>")) for name, module in model.named_modules()],
        "hooks": [(name, hooks, dict(getattr(module, hooks))) for name, module in model.named_modules() for hooks in hook_dicts],
    }


def assert_same(before, after):
    for (name, param, dtype, ptr, value, requires_grad), (name2, param2, dtype2, ptr2, value2, requires_grad2) in zip(
            before["parameters"], after["parameters"], strict=True):
        assert (name2, dtype2, ptr2, requires_grad2) == (name, dtype, ptr, requires_grad)
        assert param2 is param, f"{name}: a different Parameter object"
        torch.testing.assert_close(value2, value, rtol=0, atol=0)
    for (name, buffer, dtype, value), (name2, buffer2, dtype2, value2) in zip(before["buffers"], after["buffers"], strict=True):
        assert (name2, dtype2) == (name, dtype) and buffer2 is buffer, f"{name}: buffer replaced"
        torch.testing.assert_close(value2, value, rtol=0, atol=0)
    assert after["forward"] == before["forward"]  # same objects, and no instance `forward` left behind
    assert after["hooks"] == before["hooks"]


recipes = st.builds(
    memwise.Recipe,
    precision=st.sampled_from(["fp32", "bf16", "bf16-weights"]),
    checkpoint=st.sampled_from(["none", "full", "selective", "every_n"]),
    checkpoint_every_n=st.integers(1, 3),
    # qualified names of one model are unknown to the other: apply_ then fails, and must undo itself
    checkpoint_modules=st.sampled_from([(), ("Block",), ("blocks.1", "blocks.3"), ("transformer.h.1",), ("Block", "linear")]),
    offload=st.sampled_from(["none", "optimizer", "all"]),
    allocator=st.sampled_from(["", "expandable_segments:True"]),
    sdpa_backend=st.sampled_from(["auto", "math"]),
)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    gpt = memwise.load_workload("gpt", {"preset": "tiny", "n_layer": 3, "seq_len": 16}).model
    return {"net": Net(), "gpt": gpt}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=recipes, which=st.sampled_from(["net", "gpt"]), twice=st.booleans())
def test_apply_then_remove_restores_the_model(models, recipe, which, twice):
    model = models[which]
    before = snapshot(model)
    try:
        handle = memwise.apply_(model, recipe)
    except BadInputError as error:
        assert recipe.checkpoint == memwise.CheckpointMode.SELECTIVE and "checkpoint_modules" in str(error)
        assert_same(before, snapshot(model))
        return
    if recipe.precision == memwise.Precision.BF16_WEIGHTS:
        assert all(param.dtype == torch.bfloat16 for param in model.parameters())  # it did change something
    handle.remove()
    if twice:
        handle.remove()  # safe to call again
    assert_same(before, snapshot(model))


def test_snapshot_sees_what_apply_changes(models):
    """The property above can fail: while applied, the snapshot differs."""
    model = models["net"]
    before = snapshot(model)
    handle = memwise.apply_(model, memwise.Recipe(precision="bf16-weights", checkpoint="full"))
    with pytest.raises(AssertionError):
        assert_same(before, snapshot(model))
    handle.remove()
    assert_same(before, snapshot(model))


def test_applied_model_still_runs_and_removed_model_runs_as_before(models):
    model = models["net"].eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    with memwise.apply_(model, memwise.Recipe(checkpoint="every_n", checkpoint_every_n=2)):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    model.train()
