"""`memwise export` of `memwise compress` outputs: the compressed format is recognised, not refused."""

import sys
import types

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from memwise.cli.main import main
from memwise.compress import load_compressed, quantize
from memwise.compress.load import save_compressed, serialize
from memwise.core.errors import BadInputError
from memwise.export import ExportError, export
from memwise.export.load import load_model_file


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _save(model: nn.Module, directory, *, sparse: bool = False):
    directory.mkdir()
    save_compressed(directory / "model.pt", serialize(model, sparse=sparse))
    return directory


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    example = torch.randn(2, 1, 8, 8)
    pruned = pytest.importorskip("memwise.compress.prune_structured", reason="needs torch-pruning").prune_structured(
        _tiny(), (example,), {"3": 0.5}
    )
    calibration = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    return {
        "pruned": _save(pruned, root / "pruned", sparse=True),
        "dynamic": _save(quantize.quantize_dynamic_int8(_tiny()), root / "dynamic"),
        "static": _save(quantize.quantize_static_int8(_tiny(), calibration, calibration[0]), root / "static"),
    }


def test_directory_and_model_pt_load_as_the_compressed_model(outputs):
    for directory in outputs.values():
        for path in (directory, directory / "model.pt"):
            model = load_model_file(path)
            reference = load_compressed(directory)
            x = torch.randn(3, 1, 8, 8)
            with torch.no_grad():
                torch.testing.assert_close(model(x), reference(x))
    assert load_model_file(outputs["pruned"])[3].out_features == 8


def test_pruned_output_exports_to_onnx_from_the_cli(outputs, tmp_path):
    pytest.importorskip("onnxruntime", reason="ONNX checks need onnxruntime")
    result = CliRunner().invoke(
        main, ["export", str(outputs["pruned"]), "--input-shape", "1,1,8,8", "--to", "onnx", "--out", str(tmp_path / "p.onnx"), "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.onnx").stat().st_size > 0


def test_quantized_outputs_name_the_target_that_holds_them(outputs, tmp_path):
    model = load_model_file(outputs["dynamic"] / "model.pt")
    with pytest.raises(ExportError, match=r"quantized::linear_dynamic.*--to torchscript can hold it"):
        export(model, "torch-export", tmp_path / "d.pt2", example_inputs=torch.randn(2, 1, 8, 8))
    static = load_model_file(outputs["static"])
    with pytest.raises(ExportError, match=r"--to torch-export cannot export"):
        export(static, "torch-export", tmp_path / "s.pt2", example_inputs=torch.randn(2, 1, 8, 8))


def test_missing_module_is_named_not_called_corrupt(tmp_path):
    # A model whose class lives in a module this process cannot import (as one saved elsewhere).
    module = types.ModuleType("gone_module_for_test")
    exec("import torch\nclass Net(torch.nn.Linear):\n    pass\n", module.__dict__)
    sys.modules["gone_module_for_test"] = module
    try:
        torch.save(module.Net(2, 2), tmp_path / "model.pt")
    finally:
        del sys.modules["gone_module_for_test"]
    with pytest.raises(BadInputError, match=r"'gone_module_for_test', which is not importable") as error:
        load_model_file(tmp_path / "model.pt")
    assert "corrupt" not in str(error.value)


def test_directory_without_model_pt_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="not a memwise compress output"):
        load_model_file(tmp_path)


def test_wrong_input_shape_is_reported_as_such_not_as_an_export_failure(outputs, tmp_path):
    result = CliRunner().invoke(
        main, ["export", str(outputs["static"]), "--input-shape", "1,1,4,4", "--to", "torchscript", "--out", str(tmp_path / "s.pt")]
    )
    assert result.exit_code == 2, result.output
    assert "fails in eager PyTorch on inputs of shapes [(2, 1, 4, 4)]" in result.stderr and "--input-shape" in result.stderr
