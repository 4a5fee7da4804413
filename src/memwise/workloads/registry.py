"""Resolving a workload spec from the command line into a `Workload`.

A spec is a built-in name (`digits-cnn`, `gpt`, `hf:bert`, `hf:./my-model`, `tv:resnet50`,
`timm:vit_small_patch16_224`, ...), `path/to/file.py:function` or
`package.module:function`. The function returns a Workload; `--arg key=value` pairs become its
keyword arguments, checked against its signature.
"""

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from memwise.core.errors import WorkloadError
from memwise.core.workload import Workload

USER_MODULE_PREFIX = "memwise_user_"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuiltinWorkload:
    """A built-in workload: its name, a one-line description and the module:function that builds it."""

    name: str
    description: str
    target: str  # "memwise.workloads.<module>:<function>"

    def factory(self) -> Callable[..., Workload]:
        module_name, function_name = self.target.split(":")
        return getattr(importlib.import_module(module_name), function_name)


BUILTIN_WORKLOADS: dict[str, BuiltinWorkload] = {
    item.name: item
    for item in (
        BuiltinWorkload(
            name="digits-cnn",
            description="SimpleCNN (2 conv + 2 linear) on scikit-learn digits upsampled to 28x28",
            target="memwise.workloads.digits_cnn:digits_cnn",
        ),
        BuiltinWorkload(
            name="mlp", description="multi-layer perceptron on random data (args: width, depth)",
            target="memwise.workloads.mlp:mlp",
        ),
        BuiltinWorkload(
            name="gpt",
            description="nanoGPT-style decoder (args: preset=tiny|small|gpt2-124m, n_layer, n_head, n_embd, block_size, vocab_size, seq_len=N or a range such as 64-256)",
            target="memwise.workloads.gpt:gpt",
        ),
        BuiltinWorkload(
            name="hf:<model_type>",
            description="any transformers model from AutoConfig.for_model with random weights (args override the config)",
            target="memwise.workloads.hf:hf",
        ),
        BuiltinWorkload(
            name="tv:<name>", description="a torchvision classifier by name, random weights, image-classification loss (args: num_classes, image_size, seed)",
            target="memwise.workloads.vision:torchvision_model",
        ),
        BuiltinWorkload(
            name="timm:<name>", description="a timm model by name, random weights, image-classification loss (args: num_classes, image_size, seed)",
            target="memwise.workloads.vision:timm_model",
        ),
        BuiltinWorkload(
            name="minilm", description="pretrained all-MiniLM-L6-v2 sentence embedding, inference on sentence batches",
            target="memwise.workloads.minilm:minilm",
        ),
    )
}


def parse_args(pairs: Iterable[str]) -> dict[str, Any]:
    """Parses `key=value` strings; values are read as JSON (numbers, true/false, lists) or else kept as text."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise WorkloadError(f"--arg {pair!r}: expected key=value, e.g. --arg n_layer=4")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parsed[key] = value
    return parsed


def load_workload(spec: str, args: dict[str, Any] | None = None, *, materialize: bool = True) -> Workload:
    """Builds the Workload named by `spec` with keyword arguments `args`.

    Args:
        spec: a built-in name, `hf:...`, `path/to/file.py:function` or `package.module:function`.
        args: keyword arguments for the workload's function.
        materialize: False builds the model with its parameters on the meta device, so no weight
            is allocated (what `estimate` needs); where the function cannot build that way it is
            built normally. How it was built is added to `workload.extras["assumptions"]`.

    Raises:
        WorkloadError: unknown name, missing file or function, a function that does not return a
            Workload, or an argument it does not take / of the wrong type.
    """
    args = dict(args or {})
    if not isinstance(spec, str) or not spec.strip():
        raise WorkloadError(f"workload spec: expected a name, file.py:function or module:function, got {spec!r}")
    spec = spec.strip()
    if spec.startswith("hf:"):
        model_type = spec[3:]
        if not model_type:
            raise WorkloadError("workload spec 'hf:': name a transformers model type, e.g. hf:bert or hf:gpt2")
        return _built(lambda: BUILTIN_WORKLOADS["hf:<model_type>"].factory()(model_type, **args), spec, materialize)
    for prefix in ("tv:", "timm:"):
        if spec.startswith(prefix):
            model_name = spec[len(prefix):]
            if not model_name:
                raise WorkloadError(f"workload spec {prefix!r}: name a model, e.g. {prefix}resnet50")
            factory = BUILTIN_WORKLOADS[f"{prefix}<name>"].factory()
            _check_arguments(factory, args, spec)
            return _built(lambda: factory(model_name, **args), spec, materialize)
    if spec in BUILTIN_WORKLOADS:
        factory = BUILTIN_WORKLOADS[spec].factory()
    elif ":" in spec:
        factory = _load_function(spec)
    else:
        names = ", ".join(sorted(BUILTIN_WORKLOADS))
        raise WorkloadError(
            f"unknown workload {spec!r}; built-in workloads are: {names}; "
            "or give path/to/file.py:function or package.module:function"
        )
    _check_arguments(factory, args, spec)
    return _built(lambda: factory(**args), spec, materialize)


def _built(build: Callable[[], Any], spec: str, materialize: bool) -> Workload:
    if materialize:
        return _checked(build(), spec)
    from memwise.workloads.meta_build import build_without_weights

    result, how = build_without_weights(build, spec)
    workload = _checked(result, spec)
    workload.extras["assumptions"] = [*workload.extras.get("assumptions", ()), how]
    return workload


def user_module_name(path: str | os.PathLike[str]) -> str:
    """The module name a user workload file is imported under: stable across processes and runs.

    Derived from the resolved file path with sha256 (not `hash()`, which is salted per process), so
    a model whose classes live in that file can be unpickled in a later process (see
    `memwise.compress.load`).
    """
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return f"{USER_MODULE_PREFIX}{digest}"


def import_user_file(path: str | os.PathLike[str]) -> Any:
    """Imports (executes afresh) a user workload file under `user_module_name(path)` and returns the module."""
    module_name = user_module_name(path)
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _load_function(spec: str) -> Callable[..., Any]:
    location, _, function_name = spec.rpartition(":")
    if not function_name:
        raise WorkloadError(f"workload spec {spec!r}: name the function after ':', e.g. my_model.py:make_workload")
    if location.endswith(".py") or "/" in location or "\\" in location:
        path = Path(location)
        if not path.is_file():
            raise WorkloadError(f"workload spec {spec!r}: file {location!r} does not exist")
        try:
            module = import_user_file(path)
        except Exception as error:
            raise WorkloadError(f"workload spec {spec!r}: importing {location!r} failed: {type(error).__name__}: {error}") from error
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise WorkloadError(f"workload spec {spec!r}: cannot import module {location!r}: {error}") from error
    function = getattr(module, function_name, None)
    if function is None or not callable(function):
        available = sorted(name for name, value in vars(module).items() if callable(value) and not name.startswith("_"))
        raise WorkloadError(
            f"workload spec {spec!r}: {location!r} has no function {function_name!r}; "
            f"callables there: {', '.join(available) or 'none'}"
        )
    return function


def _check_arguments(factory: Callable[..., Any], args: dict[str, Any], spec: str) -> None:
    signature = inspect.signature(factory)
    parameters = signature.parameters
    accepts_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    valid = [name for name, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for key, value in args.items():
        if key not in parameters and not accepts_any:
            raise WorkloadError(
                f"workload {spec!r}: unknown --arg {key!r}; valid keys are {', '.join(valid) or 'none (it takes no arguments)'}"
            )
        parameter = parameters.get(key)
        if parameter is None or parameter.annotation is inspect.Parameter.empty:
            continue
        expected = parameter.annotation
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            args[key] = float(value)
        elif expected in (int, float, str, bool) and not _is_instance(value, expected):
            raise WorkloadError(
                f"workload {spec!r}: --arg {key}={value!r} is not a valid {expected.__name__}"
            )


def _is_instance(value: Any, expected: type) -> bool:
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _checked(result: Any, spec: str) -> Workload:
    if not isinstance(result, Workload):
        raise WorkloadError(
            f"workload spec {spec!r}: the function returned {type(result).__name__}, expected a memwise.Workload"
        )
    return result
