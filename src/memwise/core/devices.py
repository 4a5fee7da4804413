"""Target devices memwise can estimate for: a catalog of CUDA GPUs, custom sizes and this CPU.

A `DeviceSpec` says how much memory a device has and how much of it is gone before PyTorch's
caching allocator gets any (`context_bytes`). The allocator's budget on a device is
`memory_bytes - context_bytes`.

Assumptions:
    memory_bytes is the nominal capacity NVIDIA sells the card with, read in binary units
    (a "24 GB" card is 24 GiB = 24 * 2**30 bytes of DRAM). `torch.cuda.get_device_properties()
    .total_memory` reports a few percent less (the driver keeps some; ECC, where it is on, takes
    more), so an estimate that fits within a few percent of `memory_bytes` is a close call.
    context_bytes is the CUDA context, the loaded kernel images and the cuBLAS/cuDNN handles:
    memory the driver holds outside the caching allocator, so `torch.cuda.max_memory_reserved()`
    never shows it but `nvidia-smi` does. With lazy module loading (CUDA >= 11.7, the default in
    PyTorch's CUDA 12 builds) it is about 300-400 MB per process once a few kernels have run
    (PyTorch maintainers' figures in pytorch/pytorch#107667 and #109888). It grows with every
    distinct kernel loaded and with the GPU's SM count, so memwise uses a per-architecture default:
    300 MiB for Turing, 400 MiB for Ampere and Ada, 512 MiB for Hopper. These are round figures,
    not measurements on each card.

Known limitations:
    Workspaces that cuBLAS/cuDNN take through the caching allocator are not part of
    `context_bytes`; they belong to the allocation stream. NCCL buffers, other processes and
    MIG slices are not modelled.
"""

import dataclasses
import re
from typing import Any

from memwise.core.errors import BadInputError
from memwise.core.serialize import from_dict, to_dict
from memwise.core.units import parse_size

_GIB = 2**30
_MIB = 2**20

# CUDA context + lazily loaded kernels + library handles, by architecture (see the module
# docstring: round figures from published observations, not per-card measurements).
CONTEXT_BYTES_BY_ARCHITECTURE: dict[str, int] = {
    "turing": 300 * _MIB,
    "ampere": 400 * _MIB,
    "ada": 400 * _MIB,
    "hopper": 512 * _MIB,
}
DEFAULT_CONTEXT_BYTES = CONTEXT_BYTES_BY_ARCHITECTURE["ampere"]

_DEVICE_KINDS = ("cuda", "cpu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """A device an estimate is made for.

    Attributes:
        name: catalog name, e.g. "H100-80GB".
        kind: "cuda" or "cpu".
        memory_bytes: total device memory in bytes (see the module docstring for the assumption).
        context_bytes: bytes held outside PyTorch's caching allocator (CUDA context, kernels,
            library handles); 0 for the CPU.
        description: what the device is and where its figures come from.
    """

    name: str
    kind: str
    memory_bytes: int
    context_bytes: int
    description: str

    def __post_init__(self) -> None:
        if self.kind not in _DEVICE_KINDS:
            raise BadInputError(f"kind: invalid value {self.kind!r}; valid values are {', '.join(_DEVICE_KINDS)}")
        _check_bytes("memory_bytes", self.memory_bytes, minimum=1)
        _check_bytes("context_bytes", self.context_bytes, minimum=0)
        if self.context_bytes >= self.memory_bytes:
            raise BadInputError(
                f"context_bytes: {self.context_bytes} leaves no memory on a device of "
                f"{self.memory_bytes} bytes; it must be smaller than memory_bytes"
            )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DeviceSpec":
        return from_dict(cls, data)


def _check_bytes(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInputError(f"{name}: expected an int of bytes, got {value!r}")
    if value < minimum:
        raise BadInputError(f"{name}: must be at least {minimum} bytes, got {value}")


def _gpu(name: str, *, gib: int, architecture: str, what: str) -> DeviceSpec:
    return DeviceSpec(
        name=name,
        kind="cuda",
        memory_bytes=gib * _GIB,
        context_bytes=CONTEXT_BYTES_BY_ARCHITECTURE[architecture],
        description=(
            f"{what}; nominal {gib} GiB (torch's total_memory is a few percent lower); "
            f"context {CONTEXT_BYTES_BY_ARCHITECTURE[architecture] // _MIB} MiB assumed for "
            f"{architecture.capitalize()}"
        ),
    )


DEVICES: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        _gpu("T4", gib=16, architecture="turing", what="NVIDIA Tesla T4, Turing, 16 GB GDDR6"),
        _gpu("L4", gib=24, architecture="ada", what="NVIDIA L4, Ada Lovelace, 24 GB GDDR6"),
        _gpu("A10G", gib=24, architecture="ampere", what="NVIDIA A10G (AWS g5), Ampere, 24 GB GDDR6"),
        _gpu("RTX-3090", gib=24, architecture="ampere", what="NVIDIA GeForce RTX 3090, Ampere, 24 GB GDDR6X"),
        _gpu("RTX-4090", gib=24, architecture="ada", what="NVIDIA GeForce RTX 4090, Ada Lovelace, 24 GB GDDR6X"),
        _gpu("A100-40GB", gib=40, architecture="ampere", what="NVIDIA A100 40GB (SXM4/PCIe), Ampere, HBM2"),
        _gpu("A100-80GB", gib=80, architecture="ampere", what="NVIDIA A100 80GB (SXM4/PCIe), Ampere, HBM2e"),
        _gpu("H100-80GB", gib=80, architecture="hopper", what="NVIDIA H100 80GB (SXM5/PCIe), Hopper, HBM3/HBM2e"),
        _gpu("H200", gib=141, architecture="hopper", what="NVIDIA H200, Hopper, 141 GB HBM3e"),
    )
}

# Normalized spelling -> catalog name. Normalizing lowercases, drops vendor and form-factor words
# and punctuation, so "NVIDIA A100-SXM4-80GB" (torch.cuda.get_device_name) -> "a10080gb".
_ALIASES: dict[str, str] = {
    "t4": "T4",
    "l4": "L4",
    "a10g": "A10G",
    "rtx3090": "RTX-3090",
    "3090": "RTX-3090",
    "rtx4090": "RTX-4090",
    "4090": "RTX-4090",
    "a10040gb": "A100-40GB",
    "a10040": "A100-40GB",
    "a10080gb": "A100-80GB",
    "a10080": "A100-80GB",
    "h100": "H100-80GB",
    "h10080gb": "H100-80GB",
    "h10080": "H100-80GB",
    "h200": "H200",
    "h200141gb": "H200",
}
# Spellings that name more than one catalog entry: picking one silently could halve the budget.
_AMBIGUOUS: dict[str, tuple[str, ...]] = {"a100": ("A100-40GB", "A100-80GB")}
_DROPPED_WORDS = re.compile(r"^(nvidia|geforce|tesla|sxm\d*|pcie|hbm\w*|gddr\w*)$")


def _normalize(name: str) -> str:
    words = re.split(r"[^a-z0-9]+", name.lower())
    return "".join(word for word in words if word and not _DROPPED_WORDS.match(word))


def _valid_names() -> str:
    return ", ".join([*DEVICES, "cpu"])


def get_device(name: str) -> DeviceSpec:
    """Returns the catalog device called `name` (case-insensitive; aliases such as "h100",
    "a100-80gb", "rtx4090", "4090" and torch's device names such as "NVIDIA A100-SXM4-80GB" work).

    "cpu" returns `cpu_device()`, measured on this machine.

    Raises:
        BadInputError: the name is unknown or ambiguous; the message lists the catalog names.
    """
    if not isinstance(name, str) or not name.strip():
        raise BadInputError(f"device: expected a device name, got {name!r}; valid names are {_valid_names()}")
    if name.strip().lower() == "cpu":
        return cpu_device()
    key = _normalize(name)
    for spec_name in DEVICES:
        if key == _normalize(spec_name):
            return DEVICES[spec_name]
    if key in _ALIASES:
        return DEVICES[_ALIASES[key]]
    if key in _AMBIGUOUS:
        choices = " or ".join(_AMBIGUOUS[key])
        raise BadInputError(f"device: {name!r} is ambiguous; use {choices} (valid names are {_valid_names()})")
    raise BadInputError(
        f"device: unknown device {name!r}; valid names are {_valid_names()} "
        "(or make one with custom_device(memory_bytes))"
    )


def custom_device(
    memory_bytes: int | str,
    *,
    name: str = "custom",
    context_bytes: int | str = DEFAULT_CONTEXT_BYTES,
) -> DeviceSpec:
    """Returns a CUDA device with the given memory, e.g. `custom_device("12GiB")`.

    Args:
        memory_bytes: total device memory, bytes or a size such as "12GiB".
        name: name shown in reports.
        context_bytes: memory held outside the caching allocator; defaults to the Ampere figure
            (400 MiB), see the module docstring.
    """
    memory = parse_size(memory_bytes, name="memory_bytes")
    context = 0 if context_bytes in (0, "0") else parse_size(context_bytes, name="context_bytes")
    return DeviceSpec(
        name=name,
        kind="cuda",
        memory_bytes=memory,
        context_bytes=context,
        description=f"custom CUDA device; {memory} bytes given by the user, context {context} bytes",
    )


def cpu_device() -> DeviceSpec:
    """Returns this machine's CPU as a device: physical RAM (psutil's total), no context."""
    import psutil  # here, not at import time: only the CPU device needs it

    total = int(psutil.virtual_memory().total)
    return DeviceSpec(
        name="cpu",
        kind="cpu",
        memory_bytes=total,
        context_bytes=0,
        description="this machine's CPU; memory is the total physical RAM psutil reports",
    )
