"""`memwise doctor`: exit codes, the JSON contract, script arguments and the script's own errors."""

import json
import textwrap

import pytest
from click.testing import CliRunner

from memwise.cli.main import main

_TRAIN = '''
import sys
import torch
import torch.nn.functional as F
from torch import nn

assert sys.argv[1:] == ["--width", "256"], sys.argv
width = int(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
losses = []
for step in range(100):
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    loss = F.cross_entropy(model(x), y)
    {keep}
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
'''


def _script(tmp_path, source: str, name: str = "train.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def _run(*args: str):
    return CliRunner().invoke(main, ["doctor", *args], catch_exceptions=False)


def test_script_with_a_hazard_exits_4_with_the_json_contract(tmp_path):
    path = _script(tmp_path, _TRAIN.format(keep="losses.append(model(x))"))
    completed = _run(path, "--steps", "6", "--format", "json", "--", "--width", "256")
    assert completed.exit_code == 4, completed.output
    data = json.loads(completed.stdout)
    assert data["steps"] == 6 and data["script_error"] is None
    (hazard,) = data["hazards"]
    assert set(hazard) == {"kind", "bytes", "steps", "location", "fix", "message"}
    assert hazard["kind"] == "graph_kept"
    assert hazard["location"] == {"file": path, "line": 16}
    # Each kept output holds its graph: the output, the hidden activations and the input saved for backward.
    assert hazard["bytes"] == (16 * 4 + 16 * 256 + 16 * 32) * 4 and hazard["steps"] == [1, 2, 3, 4]


def test_clean_script_exits_0(tmp_path):
    path = _script(tmp_path, _TRAIN.format(keep="losses.append(loss.item())"))
    completed = _run(path, "--steps", "5", "--", "--width", "256")
    assert completed.exit_code == 0, completed.output
    assert "No memory hazard found." in completed.stdout


def test_script_failing_before_its_first_step_reports_its_own_error(tmp_path):
    path = _script(tmp_path, _TRAIN.format(keep="raise KeyError('no such column: label')"))
    completed = _run(path, "--", "--width", "256")
    assert completed.exit_code == 1
    assert "failed before its first step" in completed.stderr
    assert "KeyError" in completed.stderr and "no such column: label" in completed.stderr
    assert f"{path}:16" in completed.stderr


def test_script_without_optimizer_is_told_how_to_mark_steps(tmp_path):
    path = _script(tmp_path, "import torch\nmodel = torch.nn.Linear(2, 2)\nmodel(torch.ones(1, 2))\n")
    completed = _run(path)
    assert completed.exit_code == 2
    assert "w.step()" in completed.stderr and "memwise.watch(model)" in completed.stderr


def test_script_that_never_steps_is_told_how_to_mark_steps(tmp_path):
    source = "import torch\nmodel = torch.nn.Linear(2, 2)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\nmodel(torch.ones(1, 2)).sum().backward()\n"
    completed = _run(_script(tmp_path, source))
    assert completed.exit_code == 2
    assert "never called optimizer.step()" in completed.stderr and "w.step()" in completed.stderr


def test_model_on_an_unsupported_device_is_refused(tmp_path):
    source = "import torch\nmodel = torch.nn.Linear(2, 2, device='meta')\nopt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
    completed = _run(_script(tmp_path, source))
    assert completed.exit_code == 2
    assert "'meta'" in completed.stderr and "cpu or cuda" in completed.stderr


def test_clean_workload_exits_0_and_help_documents_exit_codes():
    completed = _run("mlp", "--steps", "4", "--format", "json")
    assert completed.exit_code == 0, completed.output
    assert json.loads(completed.stdout)["hazards"] == []
    inference = _run("mlp", "--mode", "infer", "--steps", "3", "--format", "json")
    assert inference.exit_code == 0 and json.loads(inference.stdout)["steps"] == 3
    help_text = _run("--help").output
    assert "4 hazards found" in help_text and "Example:" in help_text


@pytest.mark.parametrize("args,match", [
    (["mlp", "--steps", "0"], "--steps"),
    (["mlp", "--", "--lr", "1"], "SCRIPT_ARGS"),
    (["no-such-workload"], "no-such-workload"),
])
def test_bad_input_exits_2(args, match):
    completed = _run(*args)
    assert completed.exit_code == 2 and match in completed.stderr
