"""One recipe vocabulary: the same options on profile, estimate and train, --recipe FILE everywhere,
options over the file, --debug, the model-call hint, and output locations checked before any work."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from memwise.cli.estimate import estimate_command
from memwise.cli.main import main
from memwise.cli.profile import profile_command
from memwise.cli.train import train_command

RECIPE_OPTIONS = {
    "--recipe", "--batch-size", "--micro-batch-size", "--precision", "--checkpoint", "--checkpoint-every-n",
    "--checkpoint-modules", "--optimizer", "--optimizer-state", "--optimizer-impl", "--offload", "--allocator",
    "--sdpa-backend", "--arg",
}
MLP = ["mlp", "--arg", "width=16", "--arg", "depth=1", "--arg", "in_features=8"]


def _options(command) -> dict:
    return {param.opts[0]: param for param in command.params if param.opts[0].startswith("--")}


def test_profile_estimate_and_train_share_one_definition_of_the_recipe_options():
    by_command = [_options(command) for command in (profile_command, estimate_command, train_command)]
    for options in by_command:
        assert RECIPE_OPTIONS <= set(options)
        assert "--debug" in options
    for name in RECIPE_OPTIONS - {"--arg"}:
        described = {json.dumps(options[name].to_info_dict(), sort_keys=True, default=str) for options in by_command}
        assert len(described) == 1, name
        assert by_command[0][name].default is None, f"{name} must default to unset so it does not override --recipe"
    assert "--seed" in by_command[0] and "--seed" in by_command[2]


def test_options_override_the_recipe_file_and_unset_ones_keep_it(tmp_path: Path):
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps({"batch_size": 8, "micro_batch_size": 4, "precision": "bf16", "optimizer": "sgd"}))
    for command in ("estimate", "profile"):
        extra = ["--steps", "1"] if command == "profile" else []
        result = CliRunner().invoke(main, [command, *MLP, *extra, "--recipe", str(recipe_file), "--micro-batch-size", "2",
                                           "--optimizer-impl", "foreach", "--format", "json"])
        assert result.exit_code == 0, result.output
        recipe = json.loads(result.stdout)["recipe"]
        assert (recipe["batch_size"], recipe["micro_batch_size"], recipe["grad_accumulation_steps"]) == (8, 2, 4), command
        assert (recipe["precision"], recipe["optimizer"], recipe["optimizer_impl"]) == ("bf16", "sgd", "foreach"), command


def test_train_takes_every_recipe_option_and_reports_grad_accumulation(tmp_path: Path):
    result = CliRunner().invoke(main, [
        "train", *MLP, "--steps", "1", "--batch-size", "4", "--micro-batch-size", "2", "--optimizer", "adam",
        "--optimizer-impl", "for-loop", "--optimizer-state", "fp32", "--precision", "fp32", "--checkpoint", "every_n",
        "--checkpoint-every-n", "3", "--checkpoint-modules", "net.0, net.2", "--offload", "none", "--allocator", "",
        "--sdpa-backend", "math", "--format", "json",
    ])
    assert result.exit_code == 0, result.output
    recipe = json.loads(result.stdout)["final_recipe"]
    assert recipe["grad_accumulation_steps"] == 2 and recipe["optimizer_impl"] == "for-loop"
    assert recipe["checkpoint_every_n"] == 3 and recipe["checkpoint_modules"] == ["net.0", "net.2"]
    assert recipe["optimizer"] == "adam" and recipe["sdpa_backend"] == "math"


def test_help_says_what_each_optimizer_is():
    from memwise.core.recipe import OPTIMIZER_DESCRIPTIONS

    for command in ("profile", "estimate", "train"):
        text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        assert "sgd = SGD with momentum 0.9, lr 1e-3" in text
        for description in OPTIMIZER_DESCRIPTIONS.values():
            assert " ".join(description.split()) in text


def _spec(tmp_path: Path, forward: str, name: str = "user") -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(
        "import torch, memwise\n"
        "MARKER = __file__ + '.built'\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.linear = torch.nn.Linear(4, 2)\n"
        f"    def forward(self, x):\n        {forward}\n"
        "def make():\n"
        "    open(MARKER, 'w').close()\n"
        "    return memwise.Workload(Net(), lambda b: torch.randn(b, 4), loss_fn=lambda out, batch: out.sum())\n"
    )
    return f"{path}:make"


def test_debug_prints_the_traceback_only_when_asked(tmp_path: Path):
    spec = _spec(tmp_path, "raise ValueError('boom in forward')")
    plain = CliRunner().invoke(main, ["profile", spec, "--steps", "1"])
    assert plain.exit_code == 1 and "boom in forward" in plain.output and "Traceback" not in plain.output
    for args in (["profile", spec, "--steps", "1", "--debug"], ["--debug", "profile", spec, "--steps", "1"]):
        debug = CliRunner().invoke(main, args)
        assert debug.exit_code == 1 and "Traceback" in debug.output and "raise ValueError" in debug.output


def test_the_model_call_hint_appears_only_when_the_call_itself_fails(tmp_path: Path):
    inside = _spec(tmp_path, "return torch.cat(x, 1, 2, 3, 4)", name="inside")  # a TypeError raised inside forward
    result = CliRunner().invoke(main, ["profile", inside, "--steps", "1"])
    assert result.exit_code == 1 and "TypeError" in result.output
    assert "memwise calls model" not in result.output
    wrong_signature = tmp_path / "call.py"
    wrong_signature.write_text(
        "import torch, memwise\n"
        "def make():\n"
        "    return memwise.Workload(torch.nn.Linear(4, 2), lambda b: (torch.randn(b, 4), torch.randn(b, 2)))\n"
    )
    result = CliRunner().invoke(main, ["profile", f"{wrong_signature}:make", "--steps", "1"])
    assert result.exit_code == 1 and "memwise calls model(batch)" in result.output


@pytest.mark.parametrize("command,option", [("profile", "--out"), ("estimate", "--out"), ("train", "--checkpoint-dir")])
def test_output_locations_are_checked_before_any_work(tmp_path: Path, command: str, option: str):
    spec = _spec(tmp_path, "return self.linear(x)")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    extra = ["--steps", "1"] if command != "estimate" else []
    result = CliRunner().invoke(main, [command, spec, *extra, option, str(a_file / "out")])
    assert result.exit_code == 2 and option in result.output and "notes.txt" in result.output
    assert not Path(spec.rpartition(":")[0] + ".built").exists(), "the workload was built before the check"
    assert a_file.read_text() == "mine"
