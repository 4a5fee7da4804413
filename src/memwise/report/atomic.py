"""`write_atomic`: replace a file in one step, so a reader never sees half of it."""

import os
import uuid
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes `data` to `path` through a temporary file in the same directory and `os.replace`.

    The temporary file lives next to the target because `os.replace` is only atomic within one
    file system. It is created with mode 0o666 so the process umask applies, as it would to a plain
    `open(path, "w")`; on any error it is removed and the target is left as it was.

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
