"""`memwise train` exit codes and messages: refused directories, mismatched resumes, locks, Ctrl-C,
non-finite losses, seeds."""

import json
import math
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from memwise.cli.main import main
from memwise.train.checkpoint_io import CheckpointDirectory, checkpoint_name

SPEC_SOURCE = '''
import os, signal, torch, memwise

class Net(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Dropout(0.5), torch.nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x).pow(2).mean()

def make(width: int = 8, nan_at: int = -1, interrupt_at: int = -1):
    calls = []
    def make_batch(batch_size):
        calls.append(1)
        if len(calls) == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        x = torch.randn(batch_size, 4)
        if len(calls) == nan_at:
            x[0, 0] = float("nan")
        return x
    return memwise.Workload(Net(width), make_batch, name="net")
'''


@pytest.fixture
def spec(tmp_path: Path) -> str:
    path = tmp_path / "net.py"
    path.write_text(SPEC_SOURCE)
    return f"{path}:make"


def train(*args: str):
    return CliRunner().invoke(main, ["train", *args])


def strict_json(text: str):
    def reject(token):
        raise AssertionError(f"not JSON: {token}")
    return json.loads(text, parse_constant=reject)


def test_unknown_device_is_bad_input(spec):
    result = train(spec, "--steps", "1", "--device", "NOPE")
    assert result.exit_code == 2 and "NOPE" in result.output


def test_existing_checkpoint_is_refused_then_overwritten_on_request(spec, tmp_path):
    directory = tmp_path / "ckpt"
    assert train(spec, "--steps", "2", "--checkpoint-dir", str(directory)).exit_code == 0
    saved = (directory / checkpoint_name(2)).read_bytes()
    refused = train(spec, "--steps", "2", "--checkpoint-dir", str(directory))
    assert refused.exit_code == 2 and "--overwrite" in refused.output and "--resume" in refused.output
    assert (directory / checkpoint_name(2)).read_bytes() == saved
    assert train(spec, "--steps", "1", "--checkpoint-dir", str(directory), "--overwrite").exit_code == 0
    assert [path.name for path in directory.glob("*.pt")] == [checkpoint_name(1)]


def test_resume_with_other_options_names_the_fields(spec, tmp_path):
    directory = str(tmp_path / "ckpt")
    assert train(spec, "--steps", "2", "--batch-size", "4", "--checkpoint-dir", directory, "--seed", "1").exit_code == 0
    result = train(spec, "--steps", "3", "--batch-size", "2", "--arg", "width=16", "--checkpoint-dir", directory, "--seed", "1", "--resume")
    assert result.exit_code == 2
    assert "recipe.batch_size" in result.output and "workload.args.width" in result.output
    reached = train(spec, "--steps", "2", "--batch-size", "4", "--checkpoint-dir", directory, "--seed", "1", "--resume", "--format", "json")
    assert reached.exit_code == 0 and "nothing to train" in reached.stderr
    assert strict_json(reached.stdout)["steps_done"] == 2


def test_a_locked_directory_names_the_holder(spec, tmp_path):
    directory = tmp_path / "ckpt"
    with CheckpointDirectory(directory):
        result = train(spec, "--steps", "1", "--checkpoint-dir", str(directory))
    assert result.exit_code == 2 and f"pid {os.getpid()}" in result.output


def test_ctrl_c_writes_a_checkpoint_and_exits_130(spec, tmp_path):
    directory = tmp_path / "ckpt"
    result = train(spec, "--steps", "5", "--arg", "interrupt_at=2", "--checkpoint-dir", str(directory))
    assert result.exit_code == 130, result.output
    # the signal came while the batch of step 1 was drawn: step 1 finishes, then the checkpoint
    assert [path.name for path in CheckpointDirectory(directory).checkpoints()] == [checkpoint_name(2)]


def test_nonfinite_loss_is_null_in_json_with_a_warning_and_can_stop_the_run(spec, tmp_path):
    result = train(spec, "--steps", "3", "--arg", "nan_at=2", "--format", "json")
    assert result.exit_code == 0
    data = strict_json(result.stdout)
    assert data["loss_history"][1] is None and data["nonfinite_loss_steps"] == [1, 2]
    assert "warning: step 1" in result.stderr
    directory = tmp_path / "ckpt"
    stopped = train(spec, "--steps", "3", "--arg", "nan_at=2", "--stop-on-nonfinite", "--checkpoint-dir", str(directory),
                    "--checkpoint-every", "1")
    assert stopped.exit_code == 1 and "step 1" in stopped.output
    assert [path.name for path in CheckpointDirectory(directory).checkpoints()] == [checkpoint_name(1)]


def test_seed_repeats_a_dropout_run(spec):
    def losses(seed: str) -> list[float]:
        result = train(spec, "--steps", "2", "--seed", seed, "--format", "json")
        assert result.exit_code == 0
        return strict_json(result.stdout)["loss_history"]

    first = losses("3")
    assert losses("3") == first and losses("4") != first
    assert all(math.isfinite(loss) for loss in first)
