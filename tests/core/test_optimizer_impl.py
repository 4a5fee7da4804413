"""Recipe.optimizer_impl picks torch's foreach, fused or for-loop kernels, with the same results; the
optimizer settings --help describes are the ones built; recipes carry grad_accumulation_steps in JSON."""

import pytest
import torch

import memwise
from memwise.core.errors import BadInputError
from memwise.core.recipe import OPTIMIZER_SETTINGS, OptimizerImpl, OptimizerName
from memwise.core.step import build_optimizer

FLAGS = {OptimizerImpl.FOREACH: ("foreach", True), OptimizerImpl.FUSED: ("fused", True), OptimizerImpl.FOR_LOOP: ("foreach", False)}


def _workload(optimizer_factory=None) -> memwise.Workload:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    return memwise.Workload(model, lambda b: torch.randn(b, 8), loss_fn=lambda out, batch: out.square().mean(),
                            optimizer_factory=optimizer_factory)


def _train(recipe: memwise.Recipe, workload: memwise.Workload | None = None) -> list[torch.Tensor]:
    workload = workload or _workload()
    optimizer = build_optimizer(workload, recipe, workload.model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        loss = workload.model(torch.randn(6, 8, generator=generator)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [param.detach().clone() for param in workload.model.parameters()]


@pytest.mark.parametrize("name", list(OptimizerName))
@pytest.mark.parametrize("impl", list(OptimizerImpl))
def test_optimizer_impl_is_same_as_without(name, impl):
    """Tolerance: the kernels order their float operations differently (a few ulps after 3 steps)."""
    recipe = memwise.Recipe(optimizer=name, optimizer_impl=impl)
    workload = _workload()
    optimizer = build_optimizer(workload, recipe, workload.model)
    key, value = FLAGS[impl]
    assert all(group[key] is value for group in optimizer.param_groups)
    for got, expected in zip(_train(recipe), _train(memwise.Recipe(optimizer=name))):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_optimizer_impl_applies_to_the_workloads_own_torch_optimizer():
    factory = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    recipe = memwise.Recipe(optimizer_impl="fused")
    workload = _workload(factory)
    optimizer = build_optimizer(workload, recipe, workload.model)
    assert all(group["fused"] is True and group["foreach"] is None for group in optimizer.param_groups)
    for got, expected in zip(_train(recipe, _workload(factory)), _train(memwise.Recipe(), _workload(factory))):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_optimizer_impl_refuses_what_it_cannot_set():
    class Plain(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

    workload = _workload(lambda params: Plain(params))
    with pytest.raises(BadInputError, match="optimizer_impl"):
        build_optimizer(workload, memwise.Recipe(optimizer_impl="foreach"), workload.model)
    with pytest.raises(BadInputError, match="optimizer_impl"):
        memwise.Recipe(optimizer_impl="fused", optimizer_state="bf16")
    with pytest.raises(BadInputError, match="for-loop"):
        memwise.Recipe(optimizer_impl="loop")


def test_optimizer_settings_are_what_is_built():
    workload = _workload()
    for name, settings in OPTIMIZER_SETTINGS.items():
        defaults = build_optimizer(workload, memwise.Recipe(optimizer=name), workload.model).defaults
        assert {key: defaults[key] for key in settings} == settings
    adamw = build_optimizer(workload, memwise.Recipe(optimizer="adamw"), workload.model).defaults
    sgd = build_optimizer(workload, memwise.Recipe(optimizer="sgd"), workload.model).defaults
    adam = build_optimizer(workload, memwise.Recipe(optimizer="adam"), workload.model).defaults
    assert (adamw["weight_decay"], adam["weight_decay"], sgd["momentum"], adamw["betas"]) == (0.01, 0, 0.9, (0.9, 0.999))


def test_recipe_json_carries_grad_accumulation_steps_and_checks_it():
    recipe = memwise.Recipe(batch_size=8, micro_batch_size=2, optimizer_impl="fused")
    data = recipe.to_dict()
    assert data["grad_accumulation_steps"] == 4 and data["optimizer_impl"] == "fused"
    assert memwise.Recipe.from_dict(data) == recipe
    with pytest.raises(BadInputError, match="grad_accumulation_steps"):
        memwise.Recipe.from_dict({**data, "grad_accumulation_steps": 2})
    result = memwise.train(_workload(), recipe, 1)
    nested = result.to_dict()["final_recipe"]
    assert nested["grad_accumulation_steps"] == 4
    assert type(result).from_dict(result.to_dict()).final_recipe == recipe
