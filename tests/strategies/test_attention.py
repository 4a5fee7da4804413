"""SDPA backend: forcing a kernel changes which attention op runs, not what the model computes."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import memwise
from memwise.core.errors import BadInputError
from memwise.core.recipe import Mode
from memwise.core.step import StepRunner
from memwise.core.strategy import forward_context
from tests.strategies.helpers import train

CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default



class OpsSeen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def gpt():
    # Plain SGD: Adam would turn the rounding noise on gradients that are zero in exact arithmetic
    # (the key bias: softmax ignores a shift) into +-lr steps, hiding real differences in noise.
    base = memwise.load_workload("gpt", {"preset": "tiny", "n_layer": 2, "seq_len": 32})
    workload = memwise.Workload(base.model, base.make_batch, optimizer_factory=lambda params: torch.optim.SGD(params, lr=0.5),
                                name="gpt-tiny-sgd")
    return workload, [workload.make_batch(4) for _ in range(3)]


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_sdpa_backend_is_same_as_without(gpt, backend):
    workload, batches = gpt
    losses, model, _ = train(workload, memwise.Recipe(batch_size=4), batches)
    forced_losses, forced_model, _ = train(workload, memwise.Recipe(batch_size=4, sdpa_backend=backend), batches)
    # different kernels sum in a different order: fp32 rounding only (measured 8e-8 for math)
    torch.testing.assert_close(forced_losses, losses, rtol=1e-5, atol=0)
    for (name, param), forced in zip(model.named_parameters(), forced_model.parameters()):
        torch.testing.assert_close(forced, param, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend,fused", [("auto", True), ("flash", True), ("math", False)])
def test_backend_chooses_the_kernel(gpt, backend, fused):
    workload, batches = gpt
    recipe = memwise.Recipe(batch_size=4, sdpa_backend=backend)
    model = copy.deepcopy(workload.model)
    handle = memwise.apply_(model, recipe)
    with torch.no_grad(), forward_context(recipe, torch.device("cpu"), handle), OpsSeen() as seen:
        model(*batches[0])
    handle.remove()
    assert (CPU_FLASH in seen.ops) == fused


@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_cuda_only_backend_on_cpu_is_an_error(gpt, backend):
    workload, batches = gpt
    runner = StepRunner(workload, memwise.Recipe(batch_size=4, sdpa_backend=backend), Mode.TRAIN,
                        copy.deepcopy(workload.model), torch.device("cpu"))
    with pytest.raises(BadInputError, match=f"sdpa_backend: '{backend}' needs CUDA; on CPU use auto, math or flash"):
        runner.step(batches[0])
    runner.close()
