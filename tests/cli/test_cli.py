"""The command line contracts: JSON fields, exit codes, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from memwise.cli.main import main

PROFILE_FIELDS = {
    "peak_bytes", "baseline_bytes", "by_category", "by_module", "phase_at_peak", "step_ms", "workload",
    "batch_size", "recipe", "device", "torch_version",
}
CATEGORY_KEYS = {"param", "buffer", "grad", "optimizer_state", "activation", "temporary", "input"}


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_profile_json_contract_in_a_real_process(tmp_path):
    """stdout holds one JSON object and nothing else (progress and logs go to stderr)."""
    completed = subprocess.run(
        [sys.executable, "-m", "memwise.cli.main", "profile", "mlp", "--batch-size", "8", "--steps", "2",
         "--verify", "--format", "json", "--arg", "width=64", "--arg", "depth=2", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    data = json.loads(completed.stdout)
    assert PROFILE_FIELDS <= set(data)
    assert set(data["by_category"]) == CATEGORY_KEYS
    assert all(isinstance(value, int) for value in data["by_category"].values())
    assert abs(data["peak_bytes"] / data["reference_peak_bytes"] - 1) <= 0.01
    assert data["batch_size"] == 8 and data["recipe"]["batch_size"] == 8
    assert {"module", "param_bytes", "grad_bytes", "activation_bytes"} <= set(data["by_module"][0])
    assert data["phase_at_peak"] in ("forward", "backward", "optimizer")
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"{data['peak_bytes']:,}" in html
    assert json.loads((tmp_path / "out" / "profile.json").read_text())["peak_bytes"] == data["peak_bytes"]
    assert (tmp_path / "out" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_markdown_and_table():
    result = run("profile", "mlp", "--arg", "width=32", "--arg", "depth=1", "--batch-size", "4", "--steps", "1", "--format", "markdown")
    assert result.exit_code == 0
    assert "activation" in result.output and "|" in result.output
    result = run("profile", "mlp", "--arg", "width=32", "--arg", "depth=1", "--batch-size", "4", "--steps", "1", "--mode", "infer")
    assert result.exit_code == 0
    assert "peak" in result.output.lower()


def test_estimate_json_contract():
    result = run("estimate", "gpt", "--arg", "preset=tiny", "--batch-size", "4", "--device", "RTX-4090", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    for field in ("peak_bytes", "low_bytes", "high_bytes", "reserved_bytes", "context_bytes", "by_category",
                  "phase_at_peak", "device", "fits", "what_if", "elapsed_s"):
        assert field in data, field
    assert data["fits"] is True
    assert all({"change", "peak_bytes"} <= set(row) for row in data["what_if"])


def test_estimate_range_holds_the_measured_peak():
    """The CPU estimate's [low_bytes, high_bytes] must contain the peak that `profile` measures."""
    spec = ("gpt", "--arg", "preset=tiny", "--batch-size", "4", "--seed", "0")
    measured = json.loads(run("profile", *spec, "--steps", "2", "--format", "json").output)["peak_bytes"]
    estimated = json.loads(run("estimate", *spec[:-2], "--device", "cpu", "--format", "json").output)
    assert estimated["low_bytes"] <= measured <= estimated["high_bytes"]
    assert abs(estimated["peak_bytes"] / measured - 1) <= 0.03


def test_estimate_budget_that_does_not_fit_is_not_an_error():
    result = run("estimate", "gpt", "--arg", "preset=tiny", "--batch-size", "4", "--budget", "1MB", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.output)["fits"] is False


def test_devices_lists_the_catalog():
    result = run("devices", "--format", "json")
    names = {row["name"] for row in json.loads(result.output)}
    assert {"T4", "L4", "A10G", "RTX-3090", "RTX-4090", "A100-40GB", "A100-80GB", "H100-80GB", "H200"} <= names


def test_workloads_lists_builtins():
    result = run("workloads")
    for name in ("digits-cnn", "mlp", "gpt", "hf:", "minilm"):
        assert name in result.output


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["profile", "nope"], 2, "digits-cnn"),
        (["profile", "missing_file.py:make"], 2, "does not exist"),
        (["profile", "mlp", "--batch-size", "0"], 2, "--batch-size"),
        (["profile", "mlp", "--arg", "colour=red"], 2, "colour"),
        (["profile", "mlp", "--arg", "width=abc"], 2, "width"),
        (["profile", "mlp", "--arg", "width"], 2, "key=value"),
        (["estimate", "mlp", "--device", "V100-99GB"], 2, "H100-80GB"),
        (["estimate", "mlp", "--budget", "lots"], 2, "GiB"),
        (["profile", "mlp", "--precision", "fp8"], 2, "fp8"),
    ],
)
def test_bad_input_is_one_clear_line(args, code, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code
    assert message in result.output
    assert "Traceback" not in result.output


def test_function_that_returns_no_workload(tmp_path: Path):
    spec_file = tmp_path / "bad.py"
    spec_file.write_text("def make():\n    return 42\n")
    result = CliRunner().invoke(main, ["profile", f"{spec_file}:make"])
    assert result.exit_code == 2
    assert "int" in result.output and "Workload" in result.output


def test_user_file_workload_with_args(tmp_path: Path):
    spec_file = tmp_path / "mine.py"
    spec_file.write_text(
        "import torch, memwise\n"
        "def make(width: int = 8):\n"
        "    model = torch.nn.Linear(4, width)\n"
        "    return memwise.Workload(model, lambda b: torch.randn(b, 4), loss_fn=lambda out, batch: out.sum(), name='mine')\n"
    )
    result = run("profile", f"{spec_file}:make", "--arg", "width=16", "--batch-size", "2", "--steps", "1", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.output)["by_category"]["param"] == (4 * 16 + 16) * 4


def test_out_never_overwrites_a_user_file(tmp_path: Path):
    (tmp_path / "report.html").write_text("my notes")
    result = CliRunner().invoke(main, ["profile", "mlp", "--arg", "width=16", "--arg", "depth=1", "--batch-size", "2", "--steps", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert (tmp_path / "report.html").read_text() == "my notes"


def test_demo_writes_the_report(tmp_path: Path):
    result = run("demo", "--out", str(tmp_path / "demo"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "report.html").exists()
    assert "report:" in result.output


def test_model_that_does_not_take_the_batch_gets_a_hint(tmp_path: Path):
    spec_file = tmp_path / "wrong.py"
    spec_file.write_text(
        "import torch, memwise\n"
        "def make():\n"
        "    model = torch.nn.Linear(4, 2)\n"
        "    return memwise.Workload(model, lambda b: (torch.randn(b, 4), torch.randn(b, 2)), name='wrong')\n"
    )
    result = CliRunner().invoke(main, ["profile", f"{spec_file}:make", "--batch-size", "2", "--steps", "1"])
    assert result.exit_code == 1
    assert "model(*batch)" in result.output
    assert "Traceback" not in result.output


def test_report_renders_a_saved_result_again(tmp_path: Path):
    first = run("estimate", "mlp", "--arg", "width=16", "--arg", "depth=1", "--batch-size", "2", "--out", str(tmp_path / "a"))
    assert first.exit_code == 0
    saved = tmp_path / "a" / "estimate.json"
    again = run("report", str(saved), "--format", "json", "--out", str(tmp_path / "b"))
    assert again.exit_code == 0
    assert json.loads(again.stdout)["peak_bytes"] == json.loads(saved.read_text())["peak_bytes"]
    assert (tmp_path / "b" / "report.html").exists()
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"hello": 1}))
    result = CliRunner().invoke(main, ["report", str(bad)])
    assert result.exit_code == 2 and "not a memwise profile" in result.output


def test_report_overlays_an_estimate_on_a_profile(tmp_path: Path):
    spec = ("mlp", "--arg", "width=16", "--arg", "depth=1", "--batch-size", "2")
    assert run("estimate", *spec, "--out", str(tmp_path / "est")).exit_code == 0
    assert run("profile", *spec, "--out", str(tmp_path / "prof")).exit_code == 0
    both = run("report", str(tmp_path / "prof" / "profile.json"), "--compare", str(tmp_path / "est" / "estimate.json"),
               "--out", str(tmp_path / "both"))
    assert both.exit_code == 0, both.output
    html = (tmp_path / "both" / "report.html").read_text()
    assert 'id="overlay-toggle"' in html and "overlay estimated on measured" in html
    alone = run("report", str(tmp_path / "prof" / "profile.json"), "--out", str(tmp_path / "alone"))
    assert alone.exit_code == 0 and 'id="overlay-toggle"' not in (tmp_path / "alone" / "report.html").read_text()
    no_out = CliRunner().invoke(main, ["report", str(tmp_path / "prof" / "profile.json"), "--compare", str(tmp_path / "est" / "estimate.json")])
    assert no_out.exit_code == 2 and "--out" in no_out.output
