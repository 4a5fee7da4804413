"""Saving and loading compressed models: `model.pt` holds the whole module, so no user code changes.

Why a pickled module and not a state dict or `torch.export`: a pruned model has different layer
shapes than its class builds, and a quantized model has different layer types (quantized Conv2d,
dynamic quantized Linear, int8 embeddings). A state dict cannot rebuild either without the recipe,
and `torch.export` cannot serialize eager quantized modules (their packed weights are opaque
script objects) and would fix the input shapes. `torch.save(module)` stores classes by import path
plus every tensor, so `load_compressed` rebuilds exactly what was evaluated, as long as the
model's class is importable where it is loaded (the same requirement as `torch.load` of any
module). Loading unpickles: only load files you trust.

The file is a dict with a format tag and version, so a wrong file is refused with a clear message.
Weights that are sparse enough are stored as CSR tensors (int32 indices) and made dense again on
load; `size_bytes` everywhere is the length of exactly these bytes.
"""

import copy
import io
import os
import pickle
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memwise.core.errors import BadInputError
from memwise.report.atomic import write_atomic
from memwise.workloads.registry import USER_MODULE_PREFIX, import_user_file

FORMAT_TAG = "memwise-compressed-model"
FORMAT_VERSION = 1
MODEL_FILE = "model.pt"


def serialize(model: nn.Module, *, sparse: bool = False, metadata: dict[str, Any] | None = None) -> bytes:
    """Returns the bytes of `model.pt` for `model` (the model itself is not modified).

    Args:
        model: the module to store.
        sparse: store each float parameter as a CSR tensor where that is smaller than dense.
        metadata: JSON-ready facts stored alongside (methods applied, metric).
    """
    module = _picklable_copy(model)
    sparse_weights: dict[str, dict[str, Any]] = {}
    if sparse:
        for name, parameter in list(module.named_parameters()):
            packed = pack_sparse(parameter.detach())
            if packed is not None:
                sparse_weights[name] = packed
                _set_parameter(module, name, nn.Parameter(torch.empty(0, dtype=parameter.dtype), requires_grad=False))
    payload = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "module": module,
        "sparse": sparse_weights,
        "metadata": {**dict(metadata or {}), "source_files": user_sources(model)},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer, pickle_module=_pickle_module)
    return buffer.getvalue()


def saved_size_bytes(model: nn.Module, *, sparse: bool = False) -> int:
    """The size in bytes of the `model.pt` that `serialize` writes for `model`."""
    return len(serialize(model, sparse=sparse))


def save_compressed(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes serialized model bytes to `path` atomically (a reader never sees half a model)."""
    return write_atomic(path, data)


def load_compressed(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuilds a model saved by `memwise compress` (pruned shapes and quantized modules included).

    Args:
        path: the output directory of `memwise compress` or its `model.pt`.

    Returns:
        The model in eval mode, with sparse-stored weights dense again.

    Raises:
        BadInputError: the path does not exist or is not a memwise compressed model.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise BadInputError(f"load_compressed path: {str(path)!r} does not exist; give the --out directory of memwise compress or its {MODEL_FILE}")
    return deserialize(path.read_bytes(), where=str(path))


def deserialize(data: bytes, *, where: str = "model bytes") -> nn.Module:
    """The inverse of `serialize`."""
    _import_quantization_modules()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            payload = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
        except BadInputError:
            raise
        except ModuleNotFoundError as error:
            raise BadInputError(
                f"load_compressed: {where} needs the Python module {error.name!r}, which is not importable here "
                f"(the model's classes are defined there); install it or add its directory to PYTHONPATH, then load again"
            ) from error
        except Exception as error:
            raise BadInputError(f"load_compressed: {where} is not a readable torch file ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_TAG:
        raise BadInputError(f"load_compressed: {where} is not a memwise compressed model (no {FORMAT_TAG!r} header)")
    if payload.get("version") != FORMAT_VERSION:
        raise BadInputError(f"load_compressed: {where} has format version {payload.get('version')!r}; this memwise reads {FORMAT_VERSION}")
    module = payload["module"]
    for name, packed in payload["sparse"].items():
        _set_parameter(module, name, nn.Parameter(unpack_sparse(packed), requires_grad=False))
    return module.eval()


def pack_sparse(tensor: torch.Tensor) -> dict[str, Any] | None:
    """A CSR form of `tensor` (as 2-D, int32 indices) if its bytes are fewer than dense, else None."""
    if not tensor.is_floating_point() or tensor.dim() < 2 or tensor.numel() < 256:
        return None
    matrix = tensor.reshape(tensor.shape[0], -1)
    nonzero = int(torch.count_nonzero(matrix))
    index_bytes = 4
    sparse_bytes = nonzero * (tensor.element_size() + index_bytes) + (matrix.shape[0] + 1) * index_bytes
    if sparse_bytes >= tensor.numel() * tensor.element_size():
        return None
    csr = matrix.to_sparse_csr()
    return {
        "shape": list(tensor.shape),
        "crow_indices": csr.crow_indices().to(torch.int32),
        "col_indices": csr.col_indices().to(torch.int32),
        "values": csr.values().clone(),
    }


def unpack_sparse(packed: dict[str, Any]) -> torch.Tensor:
    shape = packed["shape"]
    rows = shape[0]
    columns = 1
    for size in shape[1:]:
        columns *= size
    csr = torch.sparse_csr_tensor(
        packed["crow_indices"].to(torch.int64), packed["col_indices"].to(torch.int64), packed["values"], size=(rows, columns)
    )
    return csr.to_dense().reshape(shape)


def _rebuild_module(cls: type[nn.Module], state: Any) -> nn.Module:
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.__setstate__(state)
    return module


def user_source(obj: Any) -> tuple[str, str, str] | None:
    """(module name, source file, qualified name) of a class or function defined in a user workload file.

    Such files are imported under a synthetic module name (`memwise_user_<sha256 of the path>`) that
    no other process can import by name, so these objects are pickled by reference to their file.
    """
    if not isinstance(obj, (type, types.FunctionType)):
        return None
    module_name = getattr(obj, "__module__", None) or ""
    qualname = getattr(obj, "__qualname__", "")
    if not module_name.startswith(USER_MODULE_PREFIX) or "<locals>" in qualname:
        return None
    source_file = getattr(sys.modules.get(module_name), "__file__", None)
    if source_file is None:
        return None
    return module_name, str(Path(source_file).resolve()), qualname


def user_sources(model: nn.Module) -> dict[str, str]:
    """{module name: source file} of the user workload files whose classes `model` is built from."""
    sources = {}
    for submodule in model.modules():
        source = user_source(type(submodule))
        if source is not None:
            sources[source[0]] = source[1]
    return sources


def _user_object(module_name: str, source_file: str, qualname: str) -> Any:
    """Unpickles a class or function of a user workload file, importing the file when needed."""
    module = sys.modules.get(module_name)
    if module is None:
        if not Path(source_file).is_file():
            raise BadInputError(
                f"load_compressed: the model's class {qualname!r} is defined in {source_file!r}, which no longer exists; "
                "put that file back at that path (the model is loaded from it) and load again"
            )
        try:
            module = import_user_file(source_file)
        except Exception as error:
            raise BadInputError(
                f"load_compressed: importing {source_file!r} (which defines the model's class {qualname!r}) failed: "
                f"{type(error).__name__}: {error}"
            ) from error
    value: Any = module
    for part in qualname.split("."):
        value = getattr(value, part, None)
        if value is None:
            raise BadInputError(f"load_compressed: {source_file!r} no longer defines {qualname!r}, which the saved model needs")
    return value


class _Pickler(pickle.Pickler):
    """Pickles torch.ao quantized convolutions so that they unpickle, and user-file classes by file.

    Their `__getstate__`/`__setstate__` keep only the conv's own fields, and plain unpickling skips
    `nn.Module.__init__`, so the reloaded module lacks `_modules` and fails on its first use. They
    are rebuilt the way their own `__deepcopy__` does it: `Module.__init__`, then `__setstate__`.
    """

    def reducer_override(self, obj: Any) -> Any:
        from torch.ao.nn.quantized.modules.conv import _ConvNd

        source = user_source(obj)
        if source is not None:
            return _user_object, source
        if isinstance(obj, _ConvNd):
            return _rebuild_module, (type(obj), obj.__getstate__())
        return NotImplemented


_pickle_module = types.SimpleNamespace(Pickler=_Pickler, Unpickler=pickle.Unpickler, __name__="pickle")


def _picklable_copy(model: nn.Module) -> nn.Module:
    module = copy.deepcopy(model)
    for submodule in module.modules():
        # torchao's quantize_ sets a per-instance `extra_repr` (a functools.partial) that pickle rejects.
        submodule.__dict__.pop("extra_repr", None)
        # Hooks (e.g. left over from profiling or pruning) hold closures; a saved model needs none.
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            getattr(submodule, hooks).clear()
    return module


def _set_parameter(module: nn.Module, name: str, value: nn.Parameter) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, leaf, value)


def _import_quantization_modules() -> None:
    # Unpickling a quantized module needs its class and its packed-weight ops registered.
    import torch.ao.nn.quantized  # noqa: F401
    import torch.ao.nn.quantized.dynamic  # noqa: F401

    import memwise.compress.quantize  # noqa: F401
