"""Export to ONNX, torch.export and TorchScript, verified against eager PyTorch."""

import json
import warnings

import pytest
import torch
import torch.nn.utils.prune
from click.testing import CliRunner

from memwise.cli.main import main
from memwise.core.errors import BadInputError
from memwise.export import ExportError, ExportResult, ExportTarget, export
from memwise.workloads.digits_cnn import digits_cnn


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """One ONNX export through the CLI: its JSON must be alone on stdout (the exporter prints progress)."""
    pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime (memwise[export])")
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript (memwise[export])")
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    completed = CliRunner().invoke(main, ["export", "digits-cnn", "--to", "onnx", "--out", str(path), "--format", "json"])
    assert completed.exit_code == 0, completed.output
    data = json.loads(completed.stdout)
    assert data["path"] == str(path) and data["opset"] == 18
    return digits_cnn(), ExportResult.from_dict(data)


def test_onnx_export_is_checked_at_batch_1_and_7_with_a_dynamic_batch_axis(onnx_export):
    import onnxruntime

    workload, result = onnx_export
    assert result.batch_sizes_checked == (1, 7)
    assert {(check.inputs, check.batch_size) for check in result.checks} == {("random", 1), ("real", 1), ("random", 7), ("real", 7)}
    assert result.passed and result.max_abs_diff <= 1e-4
    assert result.size_bytes == (result.path and __import__("os").path.getsize(result.path))
    # Independent check: run the file with onnxruntime at a batch size the export never saw.
    session = onnxruntime.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    assert not isinstance(session.get_inputs()[0].shape[0], int)  # symbolic: the batch axis is dynamic
    images, _ = workload.make_batch(5)
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), workload.model.eval()(images), atol=1e-4, rtol=1e-4)
    assert set(result.latency_ms) == {"eager", "exported"} and min(result.latency_ms.values()) > 0


def test_export_result_round_trips_through_json(onnx_export):
    _, result = onnx_export
    assert ExportResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    with pytest.raises(BadInputError, match="bogus"):
        ExportResult.from_dict({**result.to_dict(), "bogus": 1})


@pytest.mark.parametrize("target", ["torch-export", "torchscript"])
def test_torch_targets_match_eager_exactly(tmp_path, target):
    result = export(digits_cnn(), target, tmp_path / f"model.{'pt2' if target == 'torch-export' else 'pt'}")
    assert result.target is ExportTarget(target)
    assert result.max_abs_diff <= 1e-6 and result.batch_sizes_checked == (1, 7)
    if target == "torchscript":
        assert any("deprecated" in note for note in result.notes)


def test_static_batch_freezes_the_batch_axis(tmp_path):
    result = export(digits_cnn(), "torch-export", tmp_path / "static.pt2", dynamic_batch=False)
    assert result.batch_sizes_checked == (1,) and not result.dynamic_batch
    program = torch.export.load(result.path)
    with pytest.raises(Exception):
        program.module()(torch.randn(7, 1, 28, 28))


def test_pruned_model_exports_and_matches_its_own_eager_output(tmp_path):
    workload = digits_cnn()
    images, _ = workload.make_batch(4)
    with torch.no_grad():
        dense = workload.model.eval()(images)
    torch.nn.utils.prune.l1_unstructured(workload.model.fc1, "weight", amount=0.5)
    with torch.no_grad():
        pruned = workload.model(images)
    assert not torch.allclose(dense, pruned)  # pruning changed the model: the check below means something
    result = export(workload, "torch-export", tmp_path / "pruned.pt2")
    assert result.max_abs_diff <= 1e-6
    exported = torch.export.load(result.path).module()
    torch.testing.assert_close(exported(images), pruned)


def _dynamic_quantized():
    workload = digits_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workload.model = torch.ao.quantization.quantize_dynamic(workload.model.eval(), {torch.nn.Linear}, dtype=torch.qint8)
    return workload


def test_dynamic_quantized_model_names_the_operator_module_and_the_target_that_holds_it(tmp_path):
    with pytest.raises(ExportError, match=r"quantized::linear_dynamic in module 'fc1'.*--to torchscript can hold it"):
        export(_dynamic_quantized(), "torch-export", tmp_path / "q.pt2")
    assert not list(tmp_path.iterdir())  # no half-written file left behind


def test_dynamic_quantized_model_exports_to_torchscript(tmp_path):
    float_result = export(digits_cnn(), "torchscript", tmp_path / "float.pt")
    result = export(_dynamic_quantized(), "torchscript", tmp_path / "q.pt")
    assert result.passed and result.max_abs_diff <= 1e-6
    assert result.size_bytes < 0.4 * float_result.size_bytes  # int8 linear weights (fc1 holds 98% of them)


@torch.library.custom_op("memwise_test::twist", mutates_args=())
def _twist(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).contiguous()


class _WithCustomOp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.tail = _Twister()

    def forward(self, x):
        return self.tail(self.proj(x))


class _Twister(torch.nn.Module):
    def forward(self, x):
        return _twist(x)


def test_unsupported_operator_is_named_with_its_module(tmp_path):
    with pytest.raises(ExportError, match=r"memwise_test::twist in module 'tail'"):
        export(_WithCustomOp(), "torch-export", tmp_path / "c.pt2", example_inputs=torch.randn(2, 4))


def test_existing_output_is_refused_without_force(tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(b"keep me")
    with pytest.raises(BadInputError, match="already exists.*force=True"):
        export(digits_cnn(), "torch-export", path)
    assert path.read_bytes() == b"keep me"
    assert export(digits_cnn(), "torch-export", path, force=True).size_bytes > 1000


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(BadInputError, match="to: invalid target 'tflite'"):
        export(digits_cnn(), "tflite", tmp_path / "m")
    with pytest.raises(BadInputError, match="opset"):
        export(digits_cnn(), "torchscript", tmp_path / "m.pt", opset=17)
    with pytest.raises(BadInputError, match="example_inputs"):
        export(torch.nn.Linear(2, 2), "torchscript", tmp_path / "m.pt")


def test_cli_export_of_a_model_file_and_a_corrupt_one(tmp_path):
    model_path = tmp_path / "cnn.pt"
    torch.save(digits_cnn().model, model_path)
    runner = CliRunner()
    out = tmp_path / "cnn.pt2"
    result = runner.invoke(main, ["export", str(model_path), "--input-shape", "1,1,28,28", "--to", "torch-export",
                                  "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"path", "size_bytes", "max_abs_diff", "batch_sizes_checked", "latency_ms"} <= set(data)
    assert set(data["latency_ms"]) == {"eager", "exported"} and data["batch_sizes_checked"] == [1, 7]
    again = runner.invoke(main, ["export", str(model_path), "--input-shape", "1,1,28,28", "--to", "torch-export", "--out", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    broken = runner.invoke(main, ["export", str(truncated), "--input-shape", "1,1,28,28", "--to", "onnx", "--out", str(tmp_path / "x.onnx")])
    assert broken.exit_code == 2
    assert "truncated or corrupt" in broken.stderr and "Traceback" not in broken.output


def test_cli_help_says_torchscript_is_deprecated():
    text = CliRunner().invoke(main, ["export", "--help"]).output
    assert "DEPRECATED" in text and "Example:" in text
