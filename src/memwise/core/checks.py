"""Argument checks shared across memwise, each raising a BadInputError that names the argument."""

from typing import Any

from memwise.core.errors import BadInputError


def is_int(value: Any) -> bool:
    """True for ints, false for bools (which Python counts as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: Any, name: str) -> int:
    """Returns `value` if it is an int >= 1, else raises BadInputError naming `name`."""
    if not is_int(value) or value < 1:
        raise BadInputError(f"{name}: must be a positive integer, got {value!r}")
    return value
