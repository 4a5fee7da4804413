"""`MemmapDataset`: an array-like dataset written once to one memory-mapped file, read without copies.

Forked DataLoader workers that index a list of Python objects touch each object's reference count,
which writes to the page it lives on, so every worker slowly gets its own copy of the dataset
(copy-on-read). A memory-mapped file is backed by the page cache instead: all workers read the same
physical pages, and nothing is written to them.

File layout: 8-byte magic `MEMWISE1`, 8-byte little-endian header length, a JSON header (one entry
per field: stored dtype, original dtype, per-sample shape, byte offset), then each field's array of
shape (n, *sample_shape), 64-byte aligned.
"""

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from memwise.core.errors import BadInputError
from memwise.report.atomic import write_atomic_with

_MAGIC = b"MEMWISE1"
_ALIGN = 64
_INTEGER_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64)
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def smallest_exact_dtype(values: np.ndarray) -> np.dtype:
    """The smallest dtype that holds every value of `values` exactly (checked by round trip).

    Booleans stay bool; integers (and floats that are all whole numbers within int64) get the
    smallest integer type covering their range; other floats the smallest float type that
    round-trips bit for bit (NaN stays NaN).
    """
    if values.dtype == np.bool_:
        return np.dtype(np.bool_)
    if values.dtype.kind not in "iuf":
        raise BadInputError(f"dataset: field of dtype {values.dtype} cannot be memory-mapped; use numbers or booleans")
    candidates: tuple[Any, ...] = _FLOAT_DTYPES
    if values.dtype.kind in "iu" or (values.size and np.all(np.isfinite(values)) and np.all(values == np.round(values))
                                      and np.all(np.abs(values) < 2**62)):
        candidates = _INTEGER_DTYPES + _FLOAT_DTYPES
    if values.size == 0:
        return np.dtype(candidates[0])
    for dtype in candidates:
        if np.dtype(dtype).itemsize > values.dtype.itemsize:
            continue
        if dtype in _INTEGER_DTYPES:
            info = np.iinfo(dtype)
            if values.min() < info.min or values.max() > info.max:
                continue
        with np.errstate(over="ignore", invalid="ignore"):
            converted = values.astype(dtype)
        if np.array_equal(converted.astype(values.dtype), values, equal_nan=values.dtype.kind == "f"):
            return np.dtype(dtype)
    return values.dtype


class MemmapDataset(torch.utils.data.Dataset):
    """A map-style dataset backed by one memory-mapped file.

    `dataset[i]` returns a tuple of tensors (or one tensor when the dataset had one field) in their
    original dtypes, like the samples written. Pickling (to DataLoader workers) sends only the path;
    each process maps the file itself.

    Args:
        path: a file made by `MemmapDataset.write`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BadInputError(f"path: {str(self.path)!r} does not exist; make it with MemmapDataset.write(path, dataset)")
        self.header = _read_header(self.path)
        self.length = self.header["length"]
        self._arrays: list[np.memmap] | None = None

    @classmethod
    def write(cls, path: str | os.PathLike[str], dataset: Any, *, force: bool = False) -> "MemmapDataset":
        """Writes `dataset` to `path` once, each field in its smallest exact dtype, and opens it.

        Args:
            path: the file to write (atomically: a temporary file, then `os.replace`).
            dataset: a sequence of samples (or anything with `__len__`/`__getitem__`); a sample is
                a tensor, array or number, or a tuple/list of them (fields). Every sample has the
                same fields with the same shapes.
            force: replace an existing file.

        Returns:
            The `MemmapDataset` reading `path`.
        """
        path = Path(path)
        if path.exists() and not force:
            raise BadInputError(f"path: {str(path)!r} exists; pass force=True to replace it")
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
            raise BadInputError(f"dataset: expected a non-empty sequence of samples, got {type(dataset).__name__}")
        fields, single = _stack_fields(dataset)
        entries, stored = [], []
        for values in fields:
            dtype = smallest_exact_dtype(values)
            compact = values.astype(dtype)  # exact: smallest_exact_dtype checked the round trip
            entries.append({"stored_dtype": dtype.str, "original_dtype": str(values.dtype), "shape": list(values.shape[1:]),
                            "nbytes": compact.nbytes})
            stored.append(compact)
        header = {"length": len(fields[0]), "single": single, "fields": entries}
        header_bytes = json.dumps(header).encode()
        data_start = _aligned(16 + len(header_bytes) + 64 * len(entries))  # room for the offsets added below
        offset = data_start
        for entry in entries:
            entry["offset"] = offset
            offset = _aligned(offset + entry["nbytes"])
        header_bytes = json.dumps(header).encode()
        if 16 + len(header_bytes) > data_start:
            raise BadInputError("dataset: too many fields for one header")  # cannot happen below ~10^15 bytes

        def write_file(handle: BinaryIO) -> None:
            handle.write(_MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes)
            for entry, array in zip(entries, stored):
                handle.seek(entry["offset"])
                handle.write(np.ascontiguousarray(array).tobytes())
            handle.truncate(offset)

        write_atomic_with(path, write_file)
        return cls(path)

    @property
    def nbytes(self) -> int:
        """Bytes of sample data in the file (the header and alignment padding excluded)."""
        return sum(entry["nbytes"] for entry in self.header["fields"])

    def _maps(self) -> list[np.memmap]:
        if self._arrays is None:
            self._arrays = [
                np.memmap(self.path, dtype=np.dtype(entry["stored_dtype"]), mode="r", offset=entry["offset"],
                          shape=(self.length, *entry["shape"]))
                for entry in self.header["fields"]
            ]
        return self._arrays

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"MemmapDataset index: expected an integer, got {type(index).__name__}")
        if not -self.length <= index < self.length:
            raise IndexError(f"MemmapDataset index {index} out of range for {self.length} samples")
        values = tuple(
            torch.from_numpy(np.array(array[index], dtype=np.dtype(entry["original_dtype"])))
            for array, entry in zip(self._maps(), self.header["fields"])
        )
        return values[0] if self.header["single"] else values

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "header": self.header, "length": self.length}  # never the mapped pages

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._arrays = None

    def __repr__(self) -> str:
        dtypes = ", ".join(f"{e['original_dtype']}->{np.dtype(e['stored_dtype'])}" for e in self.header["fields"])
        return f"MemmapDataset({str(self.path)!r}, {self.length} samples, {dtypes})"


def _as_array(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise BadInputError("dataset: bfloat16 tensors have no numpy dtype; convert them to float32 first")
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _stack_fields(dataset: Sequence[Any]) -> tuple[list[np.ndarray], bool]:
    first = dataset[0]
    single = not isinstance(first, (tuple, list))
    field_count = 1 if single else len(first)
    columns: list[list[np.ndarray]] = [[] for _ in range(field_count)]
    for index in range(len(dataset)):
        sample = dataset[index]
        parts = (sample,) if single else tuple(sample)
        if len(parts) != field_count:
            raise BadInputError(f"dataset: sample {index} has {len(parts)} fields, sample 0 has {field_count}")
        for field, part in enumerate(parts):
            array = _as_array(part)
            if columns[field] and array.shape != columns[field][0].shape:
                raise BadInputError(f"dataset: sample {index} field {field} has shape {array.shape}, "
                                    f"sample 0 has {columns[field][0].shape}; every sample needs the same shapes")
            columns[field].append(array)
    return [np.stack(column) for column in columns], single


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _read_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        prefix = handle.read(16)
        if len(prefix) < 16 or prefix[:8] != _MAGIC:
            raise BadInputError(f"path: {str(path)!r} is not a MemmapDataset file (no MEMWISE1 header)")
        (length,) = struct.unpack("<Q", prefix[8:])
        return json.loads(handle.read(length))
