"""`offload`: run a model with at most a budget of its weights resident in compute memory.

The weights are cut into units: each top-level block (a transformer layer), and each other module
with parameters of its own (embeddings, final norm, head). Units that fit are pinned resident;
the others live off the compute memory and are streamed in by a forward pre-hook on the module
that needs them, evicting the least recently used streamed unit first:

- CPU compute (`where="disk"`): the weights are written once to a safetensors file; a unit is read
  by memory-mapping its byte range, copying it into fresh tensors and unmapping, so resident
  memory holds only the units in use.
- CUDA compute (`where="cpu"`): the weights sit in pinned host memory; a unit is copied to the GPU
  on a side stream, and the next streamed unit is prefetched while the current one computes.

A parameter keeps its identity (its `.data` is swapped), so tied weights stay tied and optimizers
or hooks holding the parameter see the same object. `handle.remove()` restores every weight.
"""

import collections
import dataclasses
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from memwise.core.blocks import find_blocks
from memwise.core.errors import BadInputError
from memwise.core.units import format_bytes
from memwise.export.load import safetensors_header, save_safetensors

WHERE = ("cpu", "disk")


@dataclasses.dataclass(eq=False)
class _Unit:
    name: str
    params: list[torch.nn.Parameter]
    nbytes: int
    is_block: bool
    pinned: bool = False
    resident: bool = True
    host: list[torch.Tensor] = dataclasses.field(default_factory=list)  # pinned host copies (where="cpu")
    ready: Any = None  # a CUDA event: the prefetch copy has finished


class OffloadedModel:
    """The handle `offload` returns; the model itself runs as before (`model(...)`).

    Attributes:
        model: the model, patched in place.
        budget_bytes: the most parameter bytes resident in compute memory at once.
        where: `disk` or `cpu`.
        device: the compute device.
        unit_bytes: bytes of each unit (block or module), by qualified name.
        block_names: the units that are top-level blocks.
        pinned_units: units kept resident for good.
        resident_weight_bytes: parameter bytes resident now (tied weights counted once).
        resident_weight_bytes_max: the most resident at once since the last `reset_peak()`.
        loaded_bytes: bytes streamed in since the last `reset_peak()`.
    """

    def __init__(self, model: torch.nn.Module, budget_bytes: int, where: str, device: torch.device, directory: Path | None) -> None:
        self.model = model
        self.budget_bytes = budget_bytes
        self.where = where
        self.device = device
        self._original_device = next(model.parameters()).device
        self._units = _units(model)
        self.unit_bytes = {unit.name: unit.nbytes for unit in self._units}
        self.block_names = [unit.name for unit in self._units if unit.is_block]
        largest = max(self._units, key=lambda unit: unit.nbytes)
        if budget_bytes < largest.nbytes:
            raise BadInputError(
                f"budget_bytes: {format_bytes(budget_bytes)} is smaller than the largest block, {largest.name!r} "
                f"({format_bytes(largest.nbytes)} = {largest.nbytes} bytes); one block must fit to run at all"
            )
        self._prefetch = device.type == "cuda"
        self._plan_pinned()
        self._streamed = [unit for unit in self._units if not unit.pinned]
        self._lru: collections.OrderedDict[int, _Unit] = collections.OrderedDict()
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._own_directory = directory is None
        self._directory = Path(tempfile.mkdtemp(prefix="memwise-offload-")) if directory is None else directory
        self._file: Path | None = None
        self._offsets: dict[int, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        self._hooks: list[Any] = []
        self._removed = False
        self.resident_weight_bytes = 0
        self.resident_weight_bytes_max = 0
        self.loaded_bytes = 0
        try:
            self._move_out()
        except BaseException:
            self._cleanup_files()
            raise
        self._install_hooks()

    @property
    def pinned_units(self) -> list[str]:
        return [unit.name for unit in self._units if unit.pinned]

    def reset_peak(self) -> None:
        self.resident_weight_bytes_max = self.resident_weight_bytes
        self.loaded_bytes = 0

    def evict_streamed(self) -> None:
        """Drops every streamed unit from compute memory (the next forward streams them in again)."""
        for unit in list(self._lru.values()):
            self._evict(unit)

    def remove(self) -> None:
        """Puts every weight back on its original device as a plain resident tensor; removes the hooks and files.

        Calling it again does nothing.
        """
        if self._removed:
            return
        self._removed = True
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        for unit in self._units:
            tensors = self._read(unit) if not unit.resident else [param.data for param in unit.params]
            for param, tensor in zip(unit.params, tensors):
                param.data = tensor.to(self._original_device)
        self.model.to(self._original_device)
        self._cleanup_files()

    # -- planning -------------------------------------------------------------------------------

    def _plan_pinned(self) -> None:
        """Pins units while the rest can still stream through the slots left in the budget.

        Modules outside the blocks come first (they run at both ends of a forward), then blocks in
        order. One slot of the largest streamed unit is kept free, two with prefetch.
        """
        slots = 2 if self._prefetch else 1
        pinned_bytes = 0
        order = sorted(self._units, key=lambda unit: unit.is_block)
        for unit in order:
            rest = [other.nbytes for other in self._units if not other.pinned and other is not unit]
            if pinned_bytes + unit.nbytes + slots * max(rest, default=0) <= self.budget_bytes:
                unit.pinned = True
                pinned_bytes += unit.nbytes
        if self._prefetch and not all(unit.pinned for unit in self._units):
            rest = max(unit.nbytes for unit in self._units if not unit.pinned)
            self._prefetch = pinned_bytes + 2 * rest <= self.budget_bytes

    # -- moving weights -------------------------------------------------------------------------

    def _move_out(self) -> None:
        for unit in self._units:
            if unit.pinned:
                for param in unit.params:
                    param.data = param.data.to(self.device)
                self._count(unit.nbytes)
        for name, buffer in self.model.named_buffers():
            module_name, _, attribute = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            module._buffers[attribute] = buffer.to(self.device)
        streamed = [unit for unit in self._units if not unit.pinned]
        if self.where == "disk":
            tensors = {f"{index}.{position}": param.data for index, unit in enumerate(self._units) if not unit.pinned
                       for position, param in enumerate(unit.params)}
            self._directory.mkdir(parents=True, exist_ok=True)
            self._file = self._directory / f"memwise-offload-{os.getpid()}-{id(self):x}.safetensors"
            save_safetensors(tensors, self._file)
            header, data_start = safetensors_header(self._file)
            for index, unit in enumerate(self._units):
                for position, param in enumerate(unit.params):
                    entry = header.get(f"{index}.{position}")
                    if entry is not None:
                        begin, end = entry["data_offsets"]
                        self._offsets[id(param)] = (data_start + begin, end - begin, param.dtype, tuple(param.shape))
        else:
            for unit in streamed:
                unit.host = [param.data.to("cpu").pin_memory() if torch.cuda.is_available() else param.data.to("cpu").clone()
                             for param in unit.params]
        for unit in streamed:
            for param in unit.params:
                param.data = torch.empty(0, dtype=param.dtype, device=self.device)
            unit.resident = False

    def _read(self, unit: _Unit) -> list[torch.Tensor]:
        if self.where == "cpu":
            return [tensor.to(self.device, non_blocking=True) for tensor in unit.host]
        tensors = []
        with self._file.open("rb") as handle:
            for param in unit.params:
                start, nbytes, dtype, shape = self._offsets[id(param)]
                aligned = start - start % mmap.ALLOCATIONGRANULARITY
                # ACCESS_COPY: a private mapping (never written back) that torch may view as writable.
                mapping = mmap.mmap(handle.fileno(), nbytes + start - aligned, offset=aligned, access=mmap.ACCESS_COPY)
                try:
                    view = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=start - aligned)
                    tensor = torch.empty(shape, dtype=dtype, device=self.device)
                    tensor.view(-1).view(torch.uint8).copy_(view) if tensor.numel() else None
                    del view
                finally:
                    mapping.close()  # unmap: the file's pages leave this process's resident set
                tensors.append(tensor)
        return tensors

    def _load(self, unit: _Unit) -> None:
        if unit.resident:
            self._lru.move_to_end(id(unit))
            if unit.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(unit.ready)
                unit.ready = None
            return
        self._make_room(unit.nbytes, keep=unit)
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                tensors = self._read(unit)
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
            for tensor in tensors:
                tensor.record_stream(torch.cuda.current_stream(self.device))
        else:
            tensors = self._read(unit)
        self._install(unit, tensors)

    def _install(self, unit: _Unit, tensors: list[torch.Tensor]) -> None:
        for param, tensor in zip(unit.params, tensors):
            param.data = tensor
        unit.resident = True
        self._lru[id(unit)] = unit
        self.loaded_bytes += unit.nbytes
        self._count(unit.nbytes)

    def _prefetch_after(self, unit: _Unit) -> None:
        """Starts copying the streamed unit after `unit` on the side stream, if it fits beside it."""
        if not self._prefetch or unit.pinned:
            return
        index = self._streamed.index(unit)
        following = self._streamed[(index + 1) % len(self._streamed)]
        if following.resident or following is unit:
            return
        self._make_room(following.nbytes, keep=unit, also_keep=following)
        if self.resident_weight_bytes + following.nbytes > self.budget_bytes:
            return
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            tensors = self._read(following)
            following.ready = torch.cuda.Event()
            following.ready.record(self._copy_stream)
        self._install(following, tensors)
        self._lru.move_to_end(id(unit))

    def _make_room(self, nbytes: int, *, keep: _Unit, also_keep: _Unit | None = None) -> None:
        for candidate in list(self._lru.values()):
            if self.resident_weight_bytes + nbytes <= self.budget_bytes:
                return
            if candidate is not keep and candidate is not also_keep:
                self._evict(candidate)

    def _evict(self, unit: _Unit) -> None:
        if unit.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(unit.ready)
            unit.ready = None
        for param in unit.params:
            if param.data.device.type == "cuda":
                param.data.record_stream(torch.cuda.current_stream(self.device))
            param.data = torch.empty(0, dtype=param.dtype, device=self.device)
        unit.resident = False
        self._lru.pop(id(unit), None)
        self.resident_weight_bytes -= unit.nbytes

    def _count(self, nbytes: int) -> None:
        self.resident_weight_bytes += nbytes
        self.resident_weight_bytes_max = max(self.resident_weight_bytes_max, self.resident_weight_bytes)

    def _install_hooks(self) -> None:
        owners: dict[int, _Unit] = {id(param): unit for unit in self._units for param in unit.params}
        blocks = dict(find_blocks(self.model))
        for name, module in self.model.named_modules():
            if name in blocks:
                units = [owners[id(param)] for param in module.parameters()][:1]
            else:
                units = list({id(owners[id(p)]): owners[id(p)] for p in module.parameters(recurse=False)}.values())
            units = [unit for unit in units if not unit.pinned]
            if units:
                self._hooks.append(module.register_forward_pre_hook(lambda *_, _units=units: self._before(_units)))

    def _before(self, units: list[_Unit]) -> None:
        for unit in units:
            self._load(unit)
        for unit in units:
            self._prefetch_after(unit)

    def _cleanup_files(self) -> None:
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None
        if self._own_directory:
            shutil.rmtree(self._directory, ignore_errors=True)


def offload(
    model: torch.nn.Module,
    budget_bytes: int,
    where: str | None = None,
    directory: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
) -> OffloadedModel:
    """Patches `model` in place so a forward keeps at most `budget_bytes` of parameters resident.

    Args:
        model: the model; its parameters may be on the CPU or on the compute device.
        budget_bytes: the most parameter bytes resident in compute memory at once; must hold the
            largest block.
        where: where offloaded weights live: `disk` (memory-mapped safetensors; the default on CPU)
            or `cpu` (pinned host memory; the default on CUDA, and only for CUDA compute).
        directory: where the safetensors file goes for `disk` (default: a temporary directory).
        device: the compute device (default: the device of the model's parameters).

    Returns:
        An `OffloadedModel`; call the model as usual. `handle.remove()` restores it.

    Raises:
        BadInputError: a budget smaller than the largest block (with its size), an unknown
            `where`, or `where="cpu"` for a CPU model (host memory is its compute memory).

    Known limitations:
        Streaming happens in module forward pre-hooks: a parameter read outside its module's call
        (e.g. `F.linear(x, other_module.weight)`) is not streamed in. Buffers stay resident and
        are not counted in the budget.
    """
    if not isinstance(model, torch.nn.Module):
        raise BadInputError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise BadInputError(f"budget_bytes: expected a positive number of bytes, got {budget_bytes!r}")
    if next(model.parameters(), None) is None:
        raise BadInputError("model: has no parameters to offload")
    try:
        compute = torch.device(device) if device is not None else next(model.parameters()).device
    except (RuntimeError, TypeError):
        raise BadInputError(f"device: cannot read {device!r}; use cpu or cuda[:N]") from None
    if compute.type == "cuda" and compute.index is None:
        compute = torch.device("cuda", torch.cuda.current_device())
    where = where if where is not None else ("cpu" if compute.type == "cuda" else "disk")
    if where not in WHERE:
        raise BadInputError(f"where: invalid value {where!r}; valid values are cpu, disk")
    if where == "cpu" and compute.type == "cpu":
        raise BadInputError("where: 'cpu' keeps offloaded weights in host memory, which is a CPU model's compute memory; use where='disk'")
    if directory is not None:
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise BadInputError(f"directory: {directory} exists and is not a directory")
    return OffloadedModel(model, budget_bytes, where, compute, directory)


def _units(model: torch.nn.Module) -> list[_Unit]:
    """Blocks first in forward order, then every other module owning parameters of its own."""
    seen: set[int] = set()
    units = []
    for name, block in find_blocks(model):
        params = [param for param in block.parameters() if id(param) not in seen]
        seen.update(id(param) for param in params)
        if params:
            units.append(_Unit(name, params, sum(_nbytes(param) for param in params), is_block=True))
    for name, module in model.named_modules():
        params = [param for param in module.parameters(recurse=False) if id(param) not in seen]
        seen.update(id(param) for param in params)
        if params:
            units.append(_Unit(name or type(model).__name__, params, sum(_nbytes(param) for param in params), is_block=False))
    return units


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
