"""`memwise export`: export a model and verify the artifact against eager PyTorch."""

from pathlib import Path

import click

from memwise.cli.common import emit_json, format_option, handle_errors, load_spec
from memwise.cli.key_value import print_key_value_table

TARGET_CHOICES = ("onnx", "torch-export", "torchscript")


@click.command("export")
@click.argument("spec_or_model_path", metavar="SPEC_OR_MODEL_PATH")
@click.option("--to", "target", type=click.Choice(TARGET_CHOICES), required=True,
              help="onnx (onnxruntime), torch-export (.pt2 ExportedProgram), or torchscript (DEPRECATED upstream: "
                   "kept for models only it can hold, e.g. torch.ao dynamic quantization; prefer torch-export or onnx).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The file to write.")
@click.option("--static-batch", is_flag=True, help="Fix the batch axis at 1 (default: dynamic batch axis).")
@click.option("--opset", type=int, default=None, help="ONNX opset version (default 18).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the workload function (repeatable).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="D0,D1,...",
              help="For a model file: the shape of a float32 input, batch first (repeat for several inputs).")
@format_option
@handle_errors
def export_command(spec_or_model_path, target, out, static_batch, opset, force, args, input_shapes, output_format):
    """Export SPEC_OR_MODEL_PATH and prove the export: run it against eager PyTorch.

    SPEC_OR_MODEL_PATH is a workload (digits-cnn, minilm, hf:gpt2, file.py:function), a file
    written by torch.save(model), or a memwise compress output (its --out directory or model.pt),
    with --input-shape. The artifact runs on random inputs and on the
    workload's real batches at batch sizes 1 and 7; the table shows the maximum absolute
    difference, file size and latency of eager and exported side by side. The batch axis stays
    dynamic unless --static-batch. TorchScript is deprecated upstream: use torch-export or onnx.

    \b
    Example:
      memwise export digits-cnn --to onnx --out digits.onnx
      memwise export minilm --to torch-export --out minilm.pt2 --format json
    """
    import torch

    from memwise.core.errors import BadInputError
    from memwise.export import export
    from memwise.export.load import load_model_file

    model_path = Path(spec_or_model_path)
    if (model_path.is_file() and model_path.suffix not in (".py",)) or model_path.is_dir():
        if not input_shapes:
            raise BadInputError(f"--input-shape: a model file ({model_path}) needs the shape of its input, e.g. --input-shape 1,1,28,28")
        subject = load_model_file(model_path)
        example = tuple(torch.randn(_shape(text)) for text in input_shapes)
    else:
        if input_shapes:
            raise BadInputError("--input-shape: only for a model file; a workload spec makes its own batches")
        subject, example = load_spec(spec_or_model_path, args), None
    if out.exists() and not force:
        raise BadInputError(f"--out: {out} already exists; pass --force to overwrite it")
    result = export(subject, target, out, dynamic_batch=not static_batch, example_inputs=example, opset=opset, force=force)
    if output_format == "json":
        emit_json(result.to_dict())
    else:
        _print(result, markdown=output_format == "markdown")
    if not result.passed:
        click.echo(f"memwise: error: max_abs_diff {result.max_abs_diff:.3g} exceeds the tolerance {result.tolerance:g}", err=True)
        raise SystemExit(1)


def _shape(text: str) -> tuple[int, ...]:
    from memwise.core.errors import BadInputError

    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(dim <= 0 for dim in shape):
        raise BadInputError(f"--input-shape: cannot read {text!r}; use positive integers separated by commas, e.g. 1,1,28,28")
    return shape


def _print(result, *, markdown: bool) -> None:
    from memwise.core.units import format_bytes

    rows = [
        ("file", f"{result.path} ({result.target.value}, {format_bytes(result.size_bytes)})"),
        ("batch axis", "dynamic" if result.dynamic_batch else "static"),
        ("batch sizes checked", ", ".join(str(size) for size in result.batch_sizes_checked)),
        ("max abs diff", f"{result.max_abs_diff:.3g} ({'pass' if result.passed else 'FAIL'}, tolerance {result.tolerance:g})"),
        ("latency eager / exported", f"{result.latency_ms['eager']:.3f} ms / {result.latency_ms['exported']:.3f} ms "
                                     f"({result.latency_ms['eager'] / result.latency_ms['exported']:.2f}x)"),
    ]
    rows += [(f"{check.inputs} batch {check.batch_size}", f"max abs diff {check.max_abs_diff:.3g}") for check in result.checks]
    rows += [("note", note) for note in result.notes]
    print_key_value_table(f"export of {result.model}", rows, markdown=markdown)
