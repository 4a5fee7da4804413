"""Memory-mapped loading: `load(path, mmap=True)` for safetensors files and `torch.save` checkpoints.

With `mmap=True` nothing is read until a tensor is touched, so the resident memory of a process
grows with what a forward uses, not with the file's size. safetensors files are parsed here
(an 8-byte little-endian header length, a JSON header, then the raw bytes) and mapped copy-on-write
with `torch.UntypedStorage.from_file`, so the tensors are views into the mapping.
"""

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from memwise.core.errors import BadInputError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 2**20


def load(path: str | os.PathLike[str], *, mmap: bool = True) -> Any:
    """Loads a checkpoint: a `.safetensors` file as a dict of tensors, anything else with `torch.load`.

    Args:
        path: a safetensors file, or a file written by `torch.save` (a state dict or a pickled model).
        mmap: map the file instead of reading it: tensors are views of the mapping and their pages
            are read on first touch (copy-on-write, so writing to them leaves the file unchanged).

    Returns:
        For safetensors, a dict name -> tensor; else whatever `torch.load(path, weights_only=False)`
        returns.

    Raises:
        BadInputError: the file is missing, truncated or corrupt; the message says which.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"path: {path} is not a file")
    if not isinstance(mmap, bool):
        raise BadInputError(f"mmap: expected true or false, got {mmap!r}")
    if path.suffix == ".safetensors":
        return load_safetensors(path, mmap=mmap)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
    except ModuleNotFoundError as error:
        raise BadInputError(
            f"model file {path}: the model's classes come from the Python module {error.name!r}, which is not importable "
            "here; install it or add its directory to PYTHONPATH (or run from the directory the model was saved from)"
        ) from error
    except Exception as error:
        raise BadInputError(
            f"model file {path}: cannot be read by torch.load ({type(error).__name__}: {str(error)[:200]}); "
            "the file is truncated or corrupt, or was not written by torch.save"
        ) from error


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, offset of the data section) of a safetensors file, checked against the file size."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise BadInputError(f"safetensors file {path}: truncated ({size} bytes, shorter than its 8-byte header length)")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
            raise BadInputError(f"safetensors file {path}: corrupt or truncated header (says {header_bytes} bytes, file has {size})")
        try:
            header = json.loads(handle.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadInputError(f"safetensors file {path}: the header is not valid JSON ({error}); the file is corrupt") from error
    data_start = 8 + header_bytes
    header.pop("__metadata__", None)
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            count = 1
            for dim in entry["shape"]:
                count *= dim
        except (KeyError, TypeError, ValueError) as error:
            raise BadInputError(f"safetensors file {path}: bad header entry for {name!r} ({error!r}); the file is corrupt") from error
        if end - begin != count * dtype.itemsize or begin < 0:
            raise BadInputError(f"safetensors file {path}: tensor {name!r} has {end - begin} bytes for shape {entry['shape']}; corrupt")
        if data_start + end > size:
            raise BadInputError(
                f"safetensors file {path}: truncated: tensor {name!r} ends at byte {data_start + end}, the file has {size}"
            )
    return header, data_start


def load_safetensors(path: Path, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """A safetensors file as name -> tensor (views of a copy-on-write mapping when `mmap`)."""
    header, data_start = safetensors_header(path)
    size = path.stat().st_size
    if mmap:
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    else:
        storage = torch.UntypedStorage.from_buffer(path.read_bytes(), dtype=torch.uint8)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        offset = data_start + begin
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (end - begin,))
        if offset % dtype.itemsize:  # unaligned: a view cannot start here, copy this one tensor
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Writes `tensors` as a safetensors file, one tensor at a time (no copy of the whole dict).

    Tensors are laid out by element size, largest first, after a header padded to 8 bytes, so every
    tensor starts at a multiple of its element size and a mapped load views it in place. The file
    is written next to `path` and renamed into place.
    """
    path = Path(path)
    order = sorted(tensors, key=lambda name: -tensors[name].element_size())
    entries: dict[str, Any] = {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise BadInputError(f"tensors[{name!r}]: dtype {tensor.dtype} cannot be stored in safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with temporary.open("wb") as handle:
            handle.write(struct.pack("<Q", len(header)) + header)
            for name in order:
                data = tensors[name].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
                handle.write(memoryview(data))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_model_file(path: str | os.PathLike[str]) -> torch.nn.Module:
    """A whole model saved with `torch.save(model)` (mapped, not read), or a `memwise compress` output.

    Args:
        path: a `torch.save(model)` file, a compressed `model.pt`, or the `--out` directory of
            `memwise compress` (both read with `memwise.load_compressed`).
    """
    from memwise.compress.load import FORMAT_TAG, MODEL_FILE, load_compressed

    path = Path(path)
    if path.is_dir():
        if not (path / MODEL_FILE).is_file():
            raise BadInputError(f"model path {path}: a directory, but not a memwise compress output (no {MODEL_FILE} in it)")
        return load_compressed(path)
    loaded = load(path, mmap=True)
    if isinstance(loaded, Mapping) and loaded.get("format") == FORMAT_TAG:
        return load_compressed(path)
    if not isinstance(loaded, torch.nn.Module):
        kind = "a state dict" if isinstance(loaded, Mapping) else type(loaded).__name__
        raise BadInputError(
            f"model file {path}: holds {kind}, not a model; save the module itself with torch.save(model, path) "
            "or give a workload spec (digits-cnn, hf:gpt2, file.py:function)"
        )
    return loaded
