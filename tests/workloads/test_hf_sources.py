"""`hf:` names a model type, a local model directory, a config.json, or a Hub id in the local cache;
a broken optional package never breaks an `hf:` spec that does not need it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memwise.core.errors import WorkloadError
from memwise.workloads import load_workload
from memwise.workloads.optional import root_cause

transformers = pytest.importorskip("transformers", reason="hf workloads need transformers")

BROKEN_TORCHVISION = 'raise RuntimeError("operator torchvision::nms does not exist")\n'


def _tiny_llama_config(**changes):
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    values.update(changes)
    return transformers.LlamaConfig(**values)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama_config().save_pretrained(directory)
    return directory


def _layers(workload) -> int:
    return len(workload.model.model.layers)


def test_a_local_model_directory(saved_model):
    workload = load_workload(f"hf:{saved_model}", {"seq_len": 16})
    assert workload.name == f"hf:{saved_model}"
    assert type(workload.model).__name__ == "LlamaForCausalLM" and _layers(workload) == 3
    assert workload.model.config.hidden_size == 32 and workload.make_batch(2)["input_ids"].shape == (2, 16)


def test_a_config_json_with_overrides(saved_model):
    workload = load_workload(f"hf:{saved_model / 'config.json'}", {"num_hidden_layers": 1, "hidden_size": 64})
    assert _layers(workload) == 1
    # what the saved file states (head_dim 8) stays; what is overridden changes the built model
    attention = workload.model.model.layers[0].self_attn
    assert workload.model.config.head_dim == 8 and attention.q_proj.weight.shape == (4 * 8, 64)


def test_bad_local_paths_say_what_is_wrong(tmp_path, saved_model):
    with pytest.raises(WorkloadError, match="has no config.json"):
        load_workload(f"hf:{tmp_path}")
    with pytest.raises(WorkloadError, match="no such file or directory"):
        load_workload(f"hf:{tmp_path / 'missing' / 'config.json'}")
    with pytest.raises(WorkloadError, match="unknown config key 'hidden_sise'"):
        load_workload(f"hf:{saved_model}", {"hidden_sise": 8})


def test_a_hub_id_not_in_the_cache_is_not_downloaded(tmp_path, monkeypatch):
    with pytest.raises(WorkloadError, match=r"hf:nobody-here/no-such-model: its config is not in the local Hugging Face cache.*does not download"):
        load_workload("hf:nobody-here/no-such-model")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory) -> list[str]:
    """One interpreter (transformers loads once) with a Hub cache holding acme/tiny-llama's config and a
    broken torchvision installed: what the CUDA torchvision wheel does next to a CPU torch."""
    home = tmp_path_factory.mktemp("hf-home")
    # the layout huggingface_hub writes: hub/models--org--name/{refs/main, snapshots/<commit>/config.json}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / "models--acme--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    _tiny_llama_config(num_hidden_layers=2).save_pretrained(repo / "snapshots" / commit)
    site = tmp_path_factory.mktemp("site")
    (site / "torchvision").mkdir()
    (site / "torchvision" / "__init__.py").write_text(BROKEN_TORCHVISION)
    (site / "torchvision-0.28.0.dist-info").mkdir()
    (site / "torchvision-0.28.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    done = _run("""
        import memwise
        from memwise.core.errors import WorkloadError
        from memwise.workloads import load_workload
        workload = load_workload("hf:acme/tiny-llama", {"seq_len": 8})
        print("HUB", workload.name, type(workload.model).__name__, len(workload.model.model.layers))
        for spec, args in (("hf:t5", {"num_layers": 1, "d_model": 32, "d_ff": 64, "num_heads": 2, "d_kv": 16}),
                           ("hf:bert", {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2})):
            workload = load_workload(spec, args)
            estimate = memwise.estimate(workload, memwise.Recipe(batch_size=2), "cpu")
            print("BUILT", spec, type(workload.model).__name__, estimate.peak_bytes > 0)
            print("NOTE", workload.extras["assumptions"][0] in estimate.assumptions, workload.extras["assumptions"][0])
        try:
            load_workload("tv:resnet18")
        except WorkloadError as error:
            print("TV", error)
    """, HF_HOME=str(home), PYTHONPATH=str(site))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


@pytest.mark.integration
def test_a_hub_id_whose_config_is_in_the_local_cache(fresh_process):
    assert "HUB hf:acme/tiny-llama LlamaForCausalLM 2" in fresh_process


@pytest.mark.integration
def test_a_broken_torchvision_does_not_break_hf_specs(fresh_process):
    lines = fresh_process
    assert "BUILT hf:t5 T5ForConditionalGeneration True" in lines
    assert "BUILT hf:bert BertForMaskedLM True" in lines
    note = ("NOTE True torchvision is installed but fails to import (RuntimeError: operator torchvision::nms does not exist); "
            "it was treated as not installed")
    assert lines.count(note) == 2


@pytest.mark.integration
def test_a_spec_that_needs_the_broken_package_names_it_and_the_fix(fresh_process):
    (tv,) = [line for line in fresh_process if line.startswith("TV ")]
    assert tv.startswith("TV tv:resnet18: torchvision fails to import: RuntimeError: operator torchvision::nms does not exist. "
                         "torchvision 0.28.0 is installed, but it does not work with this torch")
    assert tv.endswith("or `pip uninstall torchvision`")


def test_root_cause_names_the_package_that_raised(tmp_path, monkeypatch):
    (tmp_path / "shaky_dependency.py").write_text("raise RuntimeError('compiled for another ABI')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        try:
            import shaky_dependency  # noqa: F401
        except RuntimeError as error:
            raise ModuleNotFoundError("Could not import module 'SomeModel'") from error
    except ModuleNotFoundError as outer:
        cause, package = root_cause(outer)
    assert (type(cause), str(cause), package) == (RuntimeError, "compiled for another ABI", "shaky_dependency")
