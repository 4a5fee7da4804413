"""Writing user files safely: `write_atomic` replaces a file in one step, so a reader never sees
half of it; `check_writable_directory` says before any work whether an output directory can be used."""

import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from memwise.core.errors import BadInputError


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes `data` to `path` atomically (see `write_atomic_with`).

    Returns:
        `path` as a `Path`.
    """
    return write_atomic_with(path, lambda handle: handle.write(data))


def write_atomic_with(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Calls `write(file)` on a temporary file in `path`'s directory, then moves it to `path` with `os.replace`.

    The temporary file (`.NAME.XXXXXXXXXXXX.tmp`) lives next to the target because `os.replace` is
    only atomic within one file system. It is created with mode 0o666 so the process umask
    applies, as it would to a plain `open(path, "w")`; on any error it is removed and the target
    is left as it was. A kill during the write can leave it behind: its owner removes such files.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def check_writable_directory(path: str | os.PathLike[str], name: str) -> Path:
    """Checks that files can be created in directory `path` (made later if missing), before any work.

    The check creates and removes a probe file in `path`, or in its nearest existing parent when
    `path` does not exist yet, so permissions, read-only mounts and full quotas all show up.

    Args:
        path: the output directory.
        name: the option or argument that named it, for the error message (e.g. `--out`).

    Returns:
        `path` as a `Path`.

    Raises:
        BadInputError: `path` (or a parent) is a file, or the directory is not writable.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BadInputError(f"{name}: {str(path)!r} cannot be a directory: {str(existing)!r} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".memwise-write-check-"):
            pass
    except OSError as error:
        raise BadInputError(f"{name}: cannot write in {str(existing)!r} ({error.strerror or error}); choose a writable directory") from None
    return path
