"""`memwise compress` on the command line: JSON contract, exit codes, bad input."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from memwise.cli.main import main

TINY = str(Path(__file__).with_name("tiny_workload.py")) + ":tiny"


def _run(*args):
    return CliRunner().invoke(main, ["compress", *args])


def test_json_output_has_the_contract_fields_and_nothing_else_on_stdout(tmp_path):
    out = tmp_path / "out"
    result = _run(TINY, "--max-metric-drop", "0.02", "--methods", "quantize", "--out", str(out), "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["path"] == str(out / "model.pt") and (out / "model.pt").is_file()
    assert {"size_bytes", "metric", "latency_ms"} <= set(data["compressed"])
    assert data["size_ratio"] < 0.4 and data["metric_drop"] <= 0.02


def test_exit_3_when_nothing_meets_the_guard(tmp_path):
    result = _run(TINY, "--arg", "never_good_enough=true", "--max-metric-drop", "0.01", "--methods", "quantize",
                  "--out", str(tmp_path / "out"))
    assert result.exit_code == 3
    assert "no candidate keeps the metric drop within 0.01" in result.stderr
    assert "dynamic_int8" in result.stdout  # the trials, best found included, are still reported
    assert not (tmp_path / "out").exists()


def test_existing_out_directory_needs_force(tmp_path):
    result = _run(TINY, "--max-metric-drop", "0.01", "--out", str(tmp_path))
    assert result.exit_code == 2
    assert "--force" in result.stderr


@pytest.mark.parametrize("drop", ["1.5", "-0.01"])
def test_metric_drop_outside_zero_one_exits_2(tmp_path, drop):
    result = _run(TINY, "--max-metric-drop", drop, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "max_metric_drop" in result.stderr and drop in result.stderr


def test_workload_without_evaluate_exits_2_with_how_to(tmp_path):
    result = _run(TINY, "--arg", "no_evaluate=true", "--max-metric-drop", "0.01", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "evaluate=fn" in result.stderr


def test_help_ends_with_an_example():
    result = _run("--help")
    assert result.exit_code == 0
    assert "memwise compress digits-cnn --max-metric-drop 0.01 --out" in result.output
