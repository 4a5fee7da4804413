"""Resume: the same samples and weights as an uninterrupted run, for every kind of deterministic make_batch;
checkpoints that are refused, locked, damaged or left half-written."""

import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import memwise
from memwise.core.errors import BadInputError
from memwise.train.checkpoint_io import LOCK_NAME, CheckpointDirectory, CheckpointError, DirectoryLockedError, checkpoint_name
from memwise.train.runner import NonFiniteLossError, TrainResult

RECIPE = memwise.Recipe(batch_size=4, optimizer="adamw")


class DropoutNet(torch.nn.Module):
    """Dropout draws from torch's global generator inside the step, between the batch draws."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.net(x), labels)


def _torch_global(batch_size):
    return torch.randn(batch_size, 6), torch.randint(0, 3, (batch_size,))


def _numpy_global(batch_size):
    return torch.from_numpy(np.random.randn(batch_size, 6).astype(np.float32)), torch.from_numpy(np.random.randint(0, 3, batch_size))


def _python_global(batch_size):
    x = torch.tensor([[random.gauss(0, 1) for _ in range(6)] for _ in range(batch_size)])
    return x, torch.tensor([random.randrange(3) for _ in range(batch_size)])


def _private_generator():
    generator = torch.Generator().manual_seed(123)
    return lambda batch_size: (torch.randn(batch_size, 6, generator=generator), torch.randint(0, 3, (batch_size,), generator=generator))


MAKE_BATCH = {
    "torch-global": lambda: _torch_global,
    "torch-generator-in-closure": _private_generator,
    "numpy-global": lambda: _numpy_global,
    "python-global": lambda: _python_global,
}


def _workload(kind: str) -> memwise.Workload:
    torch.manual_seed(0)  # the same initial weights in every run
    return memwise.Workload(DropoutNet(), MAKE_BATCH[kind](), name=f"dropout-{kind}")


def _crash_after(step_to_crash: int):
    def log(record):
        if record["event"] == "step" and record["step"] == step_to_crash:
            raise RuntimeError("simulated crash")
    return log


def _assert_same_run(first, first_model, second, second_model):
    assert second.loss_history == first.loss_history  # bit-equal, not approximately
    for (name, value), other in zip(first_model.state_dict().items(), second_model.state_dict().values()):
        assert torch.equal(value, other), name


@pytest.mark.parametrize("kind", list(MAKE_BATCH))
def test_resumed_run_equals_uninterrupted_for_every_kind_of_make_batch(kind, tmp_path):
    whole_workload = _workload(kind)
    whole = memwise.train(whole_workload, RECIPE, 7, seed=1)

    with pytest.raises(RuntimeError, match="simulated crash"):
        memwise.train(_workload(kind), RECIPE, 7, seed=1, checkpoint_dir=tmp_path, checkpoint_every=2, log=_crash_after(4))
    # the process's generators moved on after the crash, as in a new process they would differ
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    resumed_workload = _workload(kind)
    warnings = []
    resumed = memwise.train(resumed_workload, RECIPE, 7, seed=1, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True,
                            log=lambda record: warnings.append(record) if record["event"] == "warning" else None)
    assert resumed.steps_done == 7 and not warnings
    _assert_same_run(whole, whole_workload.model, resumed, resumed_workload.model)


def test_replaying_the_batches_is_what_keeps_a_closure_generator_in_step(tmp_path, monkeypatch):
    """Without the replay, a private generator restarts from its seed and the resumed run sees other samples."""
    from memwise.train.runner import _Run

    whole = memwise.train(_workload("torch-generator-in-closure"), RECIPE, 4, seed=1)
    with pytest.raises(RuntimeError):
        memwise.train(_workload("torch-generator-in-closure"), RECIPE, 4, seed=1, checkpoint_dir=tmp_path,
                      checkpoint_every=2, log=_crash_after(2))
    monkeypatch.setattr(_Run, "_replay_batches", lambda self, state: None)
    resumed = memwise.train(_workload("torch-generator-in-closure"), RECIPE, 4, seed=1, checkpoint_dir=tmp_path, resume=True)
    assert resumed.loss_history[:2] == whole.loss_history[:2]
    assert resumed.loss_history[2:] != whole.loss_history[2:]


def test_a_make_batch_that_is_not_reproducible_is_reported(tmp_path):
    calls = []

    def drifting(batch_size):
        calls.append(1)
        return torch.full((batch_size, 6), float(len(calls))), torch.zeros(batch_size, dtype=torch.long)

    torch.manual_seed(0)
    memwise.train(memwise.Workload(DropoutNet(), drifting), RECIPE, 2, checkpoint_dir=tmp_path, checkpoint_every=2)
    warnings = []
    torch.manual_seed(0)
    memwise.train(memwise.Workload(DropoutNet(), drifting), RECIPE, 3, checkpoint_dir=tmp_path, resume=True,
                  log=lambda record: warnings.append(record.get("message", "")))
    assert any("make_batch gave a different batch for step 1" in message for message in warnings)


def test_ctrl_c_writes_a_checkpoint_at_the_step_boundary_and_resume_continues(tmp_path):
    whole_workload = _workload("torch-global")
    whole = memwise.train(whole_workload, RECIPE, 5, seed=3)

    def press_ctrl_c(record):
        if record["event"] == "step" and record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        memwise.train(_workload("torch-global"), RECIPE, 5, seed=3, checkpoint_dir=tmp_path, checkpoint_every=100, log=press_ctrl_c)
    assert [path.name for path in CheckpointDirectory(tmp_path).checkpoints()] == [checkpoint_name(3)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed_workload = _workload("torch-global")
    resumed = memwise.train(resumed_workload, RECIPE, 5, seed=3, checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(whole, whole_workload.model, resumed, resumed_workload.model)


def test_a_directory_with_a_checkpoint_is_refused_without_resume_or_overwrite(tmp_path):
    memwise.train(_workload("torch-global"), RECIPE, 2, checkpoint_dir=tmp_path, checkpoint_every=1)
    saved = {path.name: path.read_bytes() for path in tmp_path.glob("*.pt")}
    with pytest.raises(BadInputError, match="--overwrite"):
        memwise.train(_workload("torch-global"), RECIPE, 2, checkpoint_dir=tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.glob("*.pt")} == saved
    result = memwise.train(_workload("torch-global"), RECIPE, 1, checkpoint_dir=tmp_path, overwrite=True)
    assert result.steps_done == 1
    assert [path.name for path in tmp_path.glob("*.pt")] == [checkpoint_name(1)]


@pytest.mark.parametrize("change,field", [
    ({"recipe": RECIPE.replace(batch_size=2)}, "recipe.batch_size"),
    ({"recipe": RECIPE.replace(precision="bf16")}, "recipe.precision"),
    ({"seed": 8}, "seed"),
    ({"workload_identity": {"spec": "mlp", "args": {"width": 9}}}, "workload.args.width"),
])
def test_resume_refuses_a_different_run_by_name(tmp_path, change, field):
    original = {"recipe": RECIPE, "seed": 7, "workload_identity": {"spec": "mlp", "args": {"width": 8}}}
    memwise.train(_workload("torch-global"), steps=2, checkpoint_dir=tmp_path, **original)
    with pytest.raises(BadInputError, match=field.replace(".", r"\.")):
        memwise.train(_workload("torch-global"), steps=4, checkpoint_dir=tmp_path, resume=True, **{**original, **change})


def test_steps_is_a_target_that_can_grow_and_at_or_below_the_checkpoint_runs_nothing(tmp_path):
    memwise.train(_workload("torch-global"), RECIPE, 3, checkpoint_dir=tmp_path)
    saved = (tmp_path / checkpoint_name(3)).read_bytes()
    events = []
    done = memwise.train(_workload("torch-global"), RECIPE, 2, checkpoint_dir=tmp_path, resume=True, log=events.append)
    assert done.steps_done == 3 and len(done.loss_history) == 3
    assert any(event["event"] == "target_reached" for event in events)
    assert (tmp_path / checkpoint_name(3)).read_bytes() == saved
    grown = memwise.train(_workload("torch-global"), RECIPE, 5, checkpoint_dir=tmp_path, resume=True)
    assert grown.steps_done == 5 and grown.loss_history[:3] == done.loss_history


def test_a_second_live_run_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, str(os.getpid()).encode())
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryLockedError, match=f"pid {holder.pid}"):
            memwise.train(_workload("torch-global"), RECIPE, 1, checkpoint_dir=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its pid is still in the file, but the kernel released its lock
    assert str(holder.pid) in (tmp_path / LOCK_NAME).read_text()
    assert memwise.train(_workload("torch-global"), RECIPE, 1, checkpoint_dir=tmp_path).steps_done == 1
    assert not (tmp_path / LOCK_NAME).exists()


def test_keeps_two_checkpoints_falls_back_from_a_damaged_one_and_removes_orphans(tmp_path):
    whole_workload = _workload("torch-global")
    whole = memwise.train(whole_workload, RECIPE, 6)
    memwise.train(_workload("torch-global"), RECIPE, 4, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert [path.name for path in CheckpointDirectory(tmp_path).checkpoints()] == [checkpoint_name(4), checkpoint_name(3)]
    newest = tmp_path / checkpoint_name(4)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated, as by a full disk
    orphan = tmp_path / f".{checkpoint_name(5)}.0123456789ab.tmp"
    orphan.write_bytes(b"half a checkpoint")
    warnings = []
    resumed_workload = _workload("torch-global")
    resumed = memwise.train(resumed_workload, RECIPE, 6, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True,
                            log=lambda record: warnings.append(record["message"]) if record["event"] == "warning" else None)
    assert len(warnings) == 1 and str(newest) in warnings[0] and checkpoint_name(3) in warnings[0]
    assert not orphan.exists()
    _assert_same_run(whole, whole_workload.model, resumed, resumed_workload.model)


def test_when_no_checkpoint_can_be_read_the_error_names_each_file(tmp_path):
    memwise.train(_workload("torch-global"), RECIPE, 2, checkpoint_dir=tmp_path, checkpoint_every=1)
    for path in tmp_path.glob("*.pt"):
        path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as error:
        memwise.train(_workload("torch-global"), RECIPE, 3, checkpoint_dir=tmp_path, resume=True)
    for name in (checkpoint_name(1), checkpoint_name(2)):
        assert name in str(error.value)


def test_first_step_after_resume_counts_the_restored_optimizer_state(tmp_path):
    """gpt tiny with AdamW: the peak of every step after a resume is the uninterrupted run's peak."""
    recipe = memwise.Recipe(batch_size=4, optimizer="adamw")

    def gpt():
        return memwise.load_workload("gpt", {"preset": "tiny", "seq_len": 16})

    whole = memwise.train(gpt(), recipe, 4)
    memwise.train(gpt(), recipe, 2, checkpoint_dir=tmp_path)
    resumed = memwise.train(gpt(), recipe, 4, checkpoint_dir=tmp_path, resume=True)
    assert [m.peak_bytes for m in resumed.memory] == [m.peak_bytes for m in whole.memory]
    assert [m.allocated_bytes for m in resumed.memory] == [m.allocated_bytes for m in whole.memory]


def _nan_at_third_batch():
    calls = []

    def make_batch(batch_size):
        calls.append(1)
        x = torch.ones(batch_size, 6) * len(calls)
        if len(calls) == 3:
            x[0, 0] = float("nan")
        return x, torch.zeros(batch_size, dtype=torch.long)

    torch.manual_seed(0)
    return memwise.Workload(DropoutNet(), make_batch)


def test_nonfinite_loss_is_listed_and_written_as_null():
    import json

    result = memwise.train(_nan_at_third_batch(), RECIPE, 4)
    assert result.nonfinite_loss_steps == (2, 3)  # the NaN reached the weights: every later step is NaN too
    data = result.to_dict()
    assert data["loss_history"][2:] == [None, None] and data["nonfinite_loss_steps"] == [2, 3]
    assert all(isinstance(loss, float) for loss in data["loss_history"][:2])
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN token anywhere
    assert np.isnan(TrainResult.from_dict(data).loss_history[2])


def test_stop_on_nonfinite_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="step 2"):
        memwise.train(_nan_at_third_batch(), RECIPE, 4, checkpoint_dir=tmp_path, checkpoint_every=1, stop_on_nonfinite=True)
    assert [path.name for path in CheckpointDirectory(tmp_path).checkpoints()] == [checkpoint_name(2), checkpoint_name(1)]


def test_seed_makes_dropout_runs_repeat():
    first = memwise.train(_workload("torch-global"), RECIPE, 2, seed=5)
    torch.manual_seed(1234)
    again = memwise.train(_workload("torch-global"), RECIPE, 2, seed=5)
    other = memwise.train(_workload("torch-global"), RECIPE, 2, seed=6)
    assert first.loss_history == again.loss_history
    assert first.loss_history != other.loss_history


def test_without_fcntl_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path, monkeypatch):
    from memwise.train import checkpoint_io

    monkeypatch.setattr(checkpoint_io, "fcntl", None)
    with CheckpointDirectory(tmp_path):
        with pytest.raises(DirectoryLockedError, match=f"pid {os.getpid()}"):
            CheckpointDirectory(tmp_path).lock()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(str(dead.pid))
    with CheckpointDirectory(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
