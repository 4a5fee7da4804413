"""Compressed models whose classes live in a user `file.py:fn` workload reload in a fresh process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from memwise.compress import quantize
from memwise.compress.load import save_compressed, serialize
from memwise.workloads.registry import load_workload, user_module_name

USER_FILE = textwrap.dedent(
    """
    import torch, torch.nn as nn, memwise

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.fc(x)) + x

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(Block(), nn.Linear(8, 2))
        return memwise.Workload(model, make_batch=lambda b: torch.randn(b, 8), name="userblock", default_batch_size=4)
    """
)

LOAD = "import sys, torch, memwise; m = memwise.load_compressed(sys.argv[1]); print(type(m[0]).__name__, float(m(torch.ones(1, 8)).sum()))"


def _fresh_python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("user")
    source = directory / "my_models.py"
    source.write_text(USER_FILE)
    workload = load_workload(f"{source}:build")
    model = quantize.quantize_dynamic_int8(workload.model)
    out = directory / "out"
    out.mkdir()
    save_compressed(out / "model.pt", serialize(model))
    with torch.no_grad():
        expected = float(model(torch.ones(1, 8)).sum())
    return source, out, expected


def test_module_name_is_stable_across_processes(saved):
    source, _, _ = saved
    other = _fresh_python(f"from memwise.workloads.registry import user_module_name; print(user_module_name({str(source)!r}))")
    assert other.stdout.strip() == user_module_name(source)


def test_reload_in_fresh_process_imports_the_user_file(saved):
    source, out, expected = saved
    loaded = _fresh_python(LOAD, str(out))
    assert loaded.returncode == 0, loaded.stderr
    name, value = loaded.stdout.split()
    assert name == "Block"
    assert float(value) == pytest.approx(expected, abs=1e-5)
    payload = torch.load(out / "model.pt", weights_only=False)
    assert payload["metadata"]["source_files"] == {user_module_name(source): str(source.resolve())}


def test_moved_user_file_is_named_in_the_error(saved, tmp_path):
    source, out, _ = saved
    moved = tmp_path / "elsewhere.py"
    source.rename(moved)
    try:
        loaded = _fresh_python(LOAD, str(out))
    finally:
        moved.rename(source)
    assert loaded.returncode != 0
    assert str(source.resolve()) in loaded.stderr and "no longer exists" in loaded.stderr
