"""Writing and reading training checkpoints atomically (a crash never leaves half a file)."""

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from memwise.core.errors import BadInputError

CHECKPOINT_NAME = "memwise-train.pt"


def save_checkpoint(directory: Path, payload: dict[str, Any]) -> Path:
    """Saves `payload` to `directory/memwise-train.pt` via a temporary file and `os.replace`."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_NAME
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".memwise-train-", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(directory: Path) -> dict[str, Any]:
    """Reads the checkpoint written by `save_checkpoint`; a missing one is a clear error."""
    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        raise BadInputError(f"--resume: no checkpoint {CHECKPOINT_NAME} in {str(directory)!r}; run without --resume first")
    return torch.load(path, map_location="cpu", weights_only=False)
