"""Errors memwise raises for problems the user can fix.

Each message names what was wrong, the bad value and what would be valid, so the CLI can print it
as one line without a traceback.
"""


class MemwiseError(Exception):
    """Base class of the errors memwise raises on purpose."""


class BadInputError(MemwiseError, ValueError):
    """A user-supplied argument, spec or file is invalid (CLI exit code 2)."""


class WorkloadError(BadInputError):
    """A workload spec cannot be resolved, or its function did not return a usable Workload."""


class SymbolicExecutionError(MemwiseError):
    """A step cannot be run on fake tensors (data-dependent shapes, `.item()`, custom ops)."""
