"""Tests of CUDA autocast's casting rules on CPU tensors.

Expected dtypes come from the policies of ATen/autocast_mode.h (torch 2.13); the table itself is
checked against the ops that have an AutocastCUDA kernel in the running torch.
"""

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from memwise.estimate.cuda_autocast import (
    CUDA_AUTOCAST_POLICIES,
    CastPolicy,
    _aten_ops_with_kernel,
    cuda_autocast,
    cuda_autocast_rules,
)

BF16 = torch.bfloat16


class _OpLog(TorchDispatchMode):
    """Records (op, output dtypes) of every aten call below autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, tuple, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        output = func(*args, **(kwargs or {}))
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        self.calls.append((func, args, [t.dtype for t in outputs if isinstance(t, torch.Tensor)]))
        return output

    def casts_of(self, tensor: torch.Tensor) -> int:
        return sum(1 for func, args, _ in self.calls if func is torch.ops.aten._to_copy.default and args[0] is tensor)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield


def test_policy_table_matches_this_torchs_cuda_autocast_kernels() -> None:
    # Every aten op with an AutocastCUDA kernel in this torch build, and no other, is in the table
    # (the cuDNN RNN entries stand for _cudnn_rnn, which a CPU build does not register).
    from_table = {name for name, policy in CUDA_AUTOCAST_POLICIES.items() if policy is not CastPolicy.CUDNN_RNN}
    assert from_table == set(_aten_ops_with_kernel("AutocastCUDA"))


def test_linear_output_is_lower_precision() -> None:
    linear = torch.nn.Linear(8, 4)
    for dtype in (torch.bfloat16, torch.float16):
        with cuda_autocast(dtype):
            assert linear(torch.randn(2, 8)).dtype == dtype


def test_matmul_of_fp32_inputs_is_lower_precision() -> None:
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with cuda_autocast(BF16):
        assert torch.matmul(a, b).dtype == BF16
        assert (a @ b).dtype == BF16
        assert torch.einsum("ij,jk->ik", a, b).dtype == BF16


def test_layer_norm_runs_in_fp32_even_for_a_bf16_input() -> None:
    x = torch.randn(2, 8, dtype=BF16)
    with cuda_autocast(BF16):
        assert F.layer_norm(x, (8,)).dtype == torch.float32
        assert torch.nn.LayerNorm(8)(x).dtype == torch.float32


def test_softmax_without_dtype_returns_fp32_and_an_explicit_dtype_is_kept() -> None:
    x = torch.randn(2, 8, dtype=BF16)
    with cuda_autocast(BF16):
        assert x.softmax(-1).dtype == torch.float32
        assert F.log_softmax(x, -1).dtype == torch.float32
        assert F.softmax(x, -1, dtype=BF16).dtype == BF16
        assert x.sum().dtype == torch.float32  # fp32_set_opt_dtype
        assert x.cumsum(0).dtype == torch.float32
        assert x.norm().dtype == torch.float32
        assert torch.ops.aten.norm.Scalar(x).dtype == torch.float32  # fp32_append_dtype
        assert x.exp().dtype == torch.float32  # fp32
        assert (x**2).dtype == torch.float32


def test_cross_entropy_on_bf16_logits_gives_an_fp32_loss_from_bf16_log_probs() -> None:
    logits = torch.randn(4, 10, dtype=BF16, requires_grad=True)
    target = torch.tensor([0, 3, 9, 1])
    with cuda_autocast(BF16), _OpLog() as log:
        loss = F.cross_entropy(logits, target)
    assert loss.dtype == torch.float32
    # cross_entropy_loss calls log_softmax(self, dim, self.scalar_type()): an explicit dtype, which
    # fp32_set_opt_dtype keeps, so the saved log-probabilities stay bf16 as on a GPU
    log_softmax_dtypes = [dtypes for func, _, dtypes in log.calls if func is torch.ops.aten._log_softmax.default]
    assert log_softmax_dtypes == [[BF16]]
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == BF16


def test_promote_casts_to_the_widest_floating_input() -> None:
    low, high = torch.randn(5, dtype=BF16), torch.randn(5)
    with cuda_autocast(BF16):
        assert torch.cat([low[None], high[None]]).dtype == torch.float32  # cat promotes natively on CUDA
        assert torch.dot(low, high).dtype == torch.float32  # dot is in the promote list
        assert torch.dot(low, low).dtype == BF16
        with pytest.raises(RuntimeError, match="Unexpected floating ScalarType"):
            torch.dot(low, high.half())
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.dot(low, high)  # without autocast, dot refuses mixed dtypes


def test_ops_in_no_list_are_untouched() -> None:
    embedding = torch.nn.Embedding(10, 4)
    with cuda_autocast(BF16):
        assert embedding(torch.tensor([1, 2])).dtype == torch.float32
        assert torch.relu(torch.randn(3, dtype=BF16)).dtype == BF16
        assert torch.matmul(torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)).dtype == torch.float64
        assert torch.matmul(torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)).dtype == torch.long


def test_cpu_only_rules_do_not_apply() -> None:
    # reflection_pad2d, max_pool3d and trace are fp32 under CPU autocast and in no CUDA list
    x = torch.randn(1, 2, 4, 4, dtype=BF16)
    ops = (lambda t: F.pad(t, (1, 1, 1, 1), mode="reflect"), lambda t: F.max_pool3d(t[None], 2), lambda t: t[0, 0].trace())
    for op in ops:
        with torch.autocast("cpu", dtype=BF16):
            assert op(x).dtype == torch.float32
        with cuda_autocast(BF16):
            assert op(x).dtype == BF16


def test_banned_binary_cross_entropy_raises_as_on_cuda() -> None:
    probabilities = torch.rand(4)
    with cuda_autocast(BF16), pytest.raises(RuntimeError, match="unsafe to autocast"):
        F.binary_cross_entropy(probabilities, torch.ones(4))


def test_parameter_used_twice_is_cast_once_per_context() -> None:
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with _OpLog() as log:
        with cuda_autocast(BF16):
            linear(linear(x))
            linear(x)
        assert log.casts_of(linear.weight) == 1
        assert log.casts_of(x) == 2  # not a parameter: cast at every use
        with cuda_autocast(BF16):  # the cache dies with the context
            linear(x)
        assert log.casts_of(linear.weight) == 2
        with cuda_autocast(BF16, cache_enabled=False):
            linear(linear(x))
        assert log.casts_of(linear.weight) == 4


def test_backward_gives_fp32_grads_for_fp32_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    with cuda_autocast(BF16):
        loss = F.cross_entropy(model(torch.randn(4, 8)), torch.tensor([0, 1, 1, 0]))
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_cuda_autocast_is_same_as_cpu_autocast_for_linear() -> None:
    linear = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with cuda_autocast(BF16):
        ours = linear(x)
    ours.float().sum().backward()
    ours_grad = linear.weight.grad.clone()
    linear.zero_grad()
    with torch.autocast("cpu", dtype=BF16):
        reference = linear(x)
    reference.float().sum().backward()
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    torch.testing.assert_close(ours_grad, linear.weight.grad, rtol=0, atol=0)


def test_layer_norm_in_a_block_is_fp32_under_cuda_rules_but_bf16_under_cpu_rules() -> None:
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    seen: list[torch.dtype] = []
    block[1].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    x = torch.randn(2, 8)
    with cuda_autocast(BF16):
        assert block(x).dtype == BF16
    with torch.autocast("cpu", dtype=BF16):
        assert block(x).dtype == BF16
    assert seen == [torch.float32, BF16]


@pytest.mark.parametrize("region", ["cpu", "cuda"])
def test_nested_autocast_disabled_region_turns_the_rules_off(region: str) -> None:
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with cuda_autocast(BF16):
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == BF16
        with torch.autocast(region, enabled=False):
            assert linear(x).dtype == torch.float32
        assert linear(x).dtype == BF16


def test_leaving_restores_cpu_autocast_rules_and_flags() -> None:
    before = (torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    with cuda_autocast(BF16):
        pass
    assert (torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")) == before
    with torch.autocast("cpu", dtype=BF16):
        assert F.layer_norm(torch.randn(2, 4, dtype=BF16), (4,)).dtype == BF16  # CPU rules again


def test_checkpoint_recompute_follows_the_rules_while_they_stay_registered() -> None:
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    x = torch.randn(4, 8)
    with cuda_autocast(BF16):
        block(x).float().sum().backward()
    expected = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    with cuda_autocast_rules():  # the recompute in backward re-enters torch.autocast("cpu")
        with cuda_autocast(BF16):
            out = checkpoint(block, x, use_reentrant=False)
        out.float().sum().backward()
    for grad, reference in zip((p.grad for p in block.parameters()), expected, strict=True):
        torch.testing.assert_close(grad, reference, rtol=0, atol=0)


def test_fake_tensors_follow_the_rules() -> None:
    with FakeTensorMode():
        x = torch.randn(4, 8)
        weight = torch.randn(8, 8, requires_grad=True)
        with cuda_autocast(torch.float16):
            hidden = F.linear(x, weight)
            normed = F.layer_norm(hidden, (8,))
        assert (hidden.dtype, normed.dtype) == (torch.float16, torch.float32)
        normed.sum().backward()
        assert weight.grad is not None and weight.grad.dtype == torch.float32


def test_rnn_runs_in_lower_precision_like_cudnn() -> None:
    lstm = torch.nn.LSTM(4, 4, batch_first=True)
    with cuda_autocast(BF16):
        output, (hidden, _) = lstm(torch.randn(1, 3, 4))
    assert (output.dtype, hidden.dtype) == (BF16, BF16)
    output.float().sum().backward()
    assert lstm.weight_ih_l0.grad is not None and lstm.weight_ih_l0.grad.dtype == torch.float32


def test_unsupported_dtype_raises() -> None:
    with pytest.raises(ValueError, match="dtype"), cuda_autocast(torch.float32):
        pass


def test_estimator_caches_weight_casts_as_cuda_autocast_does() -> None:
    """`cached_cast` (autocast_mode.cpp): an fp32 leaf parameter that requires grad is cast once per
    autocast region, however often it is used; the estimator's GPU path plays that rule."""
    import memwise
    from memwise.core.recipe import Mode
    from memwise.estimate.fake_run import fake_step_log

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(64, 64, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.lin(x)).float().sum()

    workload = memwise.Workload(Twice(), lambda b: torch.randn(b, 64), name="twice")
    recipe = memwise.Recipe(batch_size=3, precision="bf16", optimizer="sgd")
    log = fake_step_log(workload, recipe, Mode.TRAIN, steps=1, round_size=lambda n: n, probe=None, cuda_autocast=True)
    phase, casts = "idle", 0
    for event in log.events:
        if event[0] == "phase":
            phase = event[1]
        elif event[0] == "alloc" and phase == "forward" and event[2] == 64 * 64 * 2:  # a bf16 copy of the weight
            casts += 1
    assert casts == 1
