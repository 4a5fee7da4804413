"""Memory-mapped loading: resident memory grows with what is touched, not with the file."""

import json
import subprocess
import sys

import pytest
import torch

from memwise.core.errors import BadInputError
from memwise.export.load import load, save_safetensors

FULL_LAYERS = 32  # of 16 MiB each: the "about 500 MB" checkpoint

_MEASURE = """
import gc, json, sys, psutil, torch
from memwise.export.load import load
process = psutil.Process()
results = []
for path in sys.argv[1:]:
    gc.collect()
    before = process.memory_info().rss
    state = load(path, mmap=True)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048, bias=False, device="meta") for _ in range(len(state))])
    model.load_state_dict({k.replace("layers.", ""): v for k, v in state.items()}, assign=True)
    loaded = process.memory_info().rss
    with torch.no_grad():
        model(torch.ones(1, 2048))  # touches every weight
    touched = process.memory_info().rss
    results.append({"loaded": loaded - before, "touched": touched - before})
    del state, model  # unmaps the file
print(json.dumps(results))
"""


def _check_mmap_load(directory, layers, rss_limit_bytes):
    tensors = {f"layers.{i}.weight": torch.randn(2048, 2048) for i in range(layers)}  # 16 MiB each
    paths = [save_safetensors(tensors, directory / "model.safetensors"), directory / "model.pt"]
    torch.save(tensors, paths[1])
    del tensors
    checkpoint_bytes = layers * 16 * 2**20
    assert all(path.stat().st_size >= checkpoint_bytes for path in paths)
    completed = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, paths)], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    for rss in json.loads(completed.stdout.strip().splitlines()[-1]):  # safetensors, then torch.save
        assert rss["loaded"] < rss_limit_bytes
        assert rss["touched"] > 0.8 * checkpoint_bytes  # the measurement sees the weights once a forward reads them


@pytest.mark.slow
def test_mmap_load_of_500mb_raises_rss_by_less_than_100mb(tmp_path):
    _check_mmap_load(tmp_path, FULL_LAYERS, 100 * 2**20)


def test_safetensors_round_trip_and_interoperability(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch", reason="interoperability check needs safetensors")
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int8), "c": torch.randn(3, 1).bfloat16()}
    save_safetensors(tensors, tmp_path / "mine.safetensors")
    safetensors.save_file(tensors, tmp_path / "theirs.safetensors")
    for name in ("mine", "theirs"):
        loaded = load(tmp_path / f"{name}.safetensors")
        assert all(torch.equal(loaded[key], tensors[key]) for key in tensors)
    theirs = safetensors.load_file(tmp_path / "mine.safetensors")
    assert all(torch.equal(theirs[key], tensors[key]) for key in tensors)


def test_truncated_and_corrupt_files_get_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"w": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-100])
    with pytest.raises(BadInputError, match="truncated: tensor 'w' ends at byte"):
        load(tmp_path / "short.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(BadInputError, match="not valid JSON"):
        load(tmp_path / "garbage.safetensors")
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "w.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:500])
    with pytest.raises(BadInputError, match="truncated or corrupt"):
        load(tmp_path / "cut.pt")
    with pytest.raises(BadInputError, match="not a file"):
        load(tmp_path / "missing.pt")
