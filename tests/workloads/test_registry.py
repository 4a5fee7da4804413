import textwrap

import pytest

from memwise.core.errors import BadInputError, WorkloadError
from memwise.core.workload import Workload, call_model, loss_from_output
from memwise.workloads.registry import BUILTIN_WORKLOADS, load_workload, parse_args

USER_FILE = """
import torch
from memwise.core.workload import Workload

def make(*, width: int = 4):
    model = torch.nn.Linear(width, 1)
    return Workload(model, lambda n: torch.randn(n, width), loss_fn=lambda out, batch: out.sum(), name="user")

def not_a_workload():
    return 42
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(USER_FILE))
    return path


def test_unknown_name_lists_the_built_in_workloads():
    with pytest.raises(WorkloadError, match="unknown workload 'nope'") as error:
        load_workload("nope")
    for name in ("digits-cnn", "mlp", "gpt", "minilm"):
        assert name in str(error.value)


def test_file_function_spec_builds_the_workload_with_its_arguments(user_file):
    workload = load_workload(f"{user_file}:make", {"width": 6})
    assert isinstance(workload, Workload) and workload.name == "user"
    assert workload.model.in_features == 6


def test_function_returning_something_else_is_rejected(user_file):
    with pytest.raises(WorkloadError, match="returned int, expected a memwise.Workload"):
        load_workload(f"{user_file}:not_a_workload")


def test_missing_function_lists_the_callables_in_the_file(user_file):
    with pytest.raises(WorkloadError, match="no function 'build'.*make, not_a_workload"):
        load_workload(f"{user_file}:build")


def test_unknown_argument_names_the_key_and_the_valid_keys():
    expected = r"unknown --arg 'widht'; valid keys are width, depth, in_features, num_classes, seed"
    with pytest.raises(WorkloadError, match=expected):
        load_workload("mlp", {"widht": 8})


def test_argument_of_the_wrong_type_names_the_key():
    with pytest.raises(WorkloadError, match=r"--arg width='abc' is not a valid int"):
        load_workload("mlp", parse_args(["width=abc"]))


def test_optional_gpt_argument_of_the_wrong_type_is_caught_by_the_workload():
    # `int | None` is not type-checked by the registry; gpt() checks it itself.
    with pytest.raises(BadInputError, match="n_layer"):
        load_workload("gpt", parse_args(["n_layer=abc"]))


def test_parsed_arguments_reach_the_workload():
    workload = load_workload("mlp", parse_args(["width=16", "depth=3"]))
    assert len(workload.model.blocks) == 3 and workload.model.blocks[1].linear.in_features == 16
    workload = load_workload("gpt", parse_args(["preset=tiny", "n_layer=1"]))
    assert len(workload.model.transformer.h) == 1


@pytest.mark.parametrize("name", ["digits-cnn", "mlp", "gpt"])
def test_built_in_workloads_run_one_step_with_defaults(name):
    assert name in BUILTIN_WORKLOADS
    workload = load_workload(name)
    batch = workload.make_batch(2)
    loss = loss_from_output(call_model(workload.model, batch), batch, workload.loss_fn)
    loss.backward()
    assert loss.ndim == 0 and loss.item() > 0
    assert all(parameter.grad is not None for parameter in workload.model.parameters())
