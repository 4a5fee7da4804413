"""CLI errors name CLI options (--offload disk, --force), not the library's keyword arguments."""

from click.testing import CliRunner

from memwise.cli.main import main


def test_run_offload_cpu_on_cpu_names_the_cli_option():
    result = CliRunner().invoke(main, ["run", "digits-cnn", "--budget", "1MB", "--offload", "cpu", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "--offload disk" in result.stderr
    assert "where=" not in result.stderr


def test_export_existing_out_names_force(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(main, ["export", "digits-cnn", "--to", "torchscript", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "pass --force" in result.stderr and "force=True" not in result.stderr
    assert out.read_bytes() == b"keep me"
