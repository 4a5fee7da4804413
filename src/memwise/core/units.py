"""Human sizes <-> bytes. Memory inside memwise is always an int of bytes."""

import re

from memwise.core.errors import BadInputError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, *, name: str = "size") -> int:
    """Parses `24GiB`, `500MB`, `1.5G` or plain bytes into an int of bytes.

    Binary units (KiB, MiB, GiB, TiB and the single letters K, M, G, T) are powers of 1024;
    decimal units (KB, MB, GB, TB) are powers of 1000.
    """
    if isinstance(text, bool):
        raise BadInputError(f"{name}: expected a size such as 24GiB, 500MB or 1048576, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise BadInputError(
                f"{name}: cannot read {text!r} as a size; use a number with an optional unit: "
                "plain bytes (1048576), KiB/MiB/GiB/TiB (powers of 1024) or KB/MB/GB/TB (powers of 1000), "
                "e.g. 24GiB or 500MB"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BadInputError(f"{name}: must be a positive size, got {text!r}")
    return value


def format_bytes(num_bytes: int | float) -> str:
    """Formats bytes with a binary unit, e.g. 1536 -> '1.50 KiB'."""
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
