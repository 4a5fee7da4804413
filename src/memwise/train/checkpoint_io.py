"""A training run's checkpoint directory: locked by one run, the last two checkpoints kept.

Files in the directory:
    `memwise-train-step000000010.pt`: the checkpoint after 10 steps; the two newest are kept, so a
        checkpoint damaged by a crash (or a full disk) leaves the previous one to resume from.
    `.memwise-train.lock`: held (`fcntl.flock`) by the live run, with its pid inside. The kernel
        drops the lock when the process dies, so the lock of a killed run is taken over. (Without
        fcntl, on Windows, the file is created exclusively and a lock whose pid is dead is taken over.)
    `.memwise-train-step*.pt.*.tmp`: a checkpoint being written (see `report.atomic`); one left by
        a kill during a save is removed when the next run takes the lock.
"""

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memwise.core.errors import BadInputError, MemwiseError
from memwise.report.atomic import write_atomic_with

try:
    import fcntl
except ImportError:  # Windows: an exclusive create, and a lock whose pid is dead is taken over
    fcntl = None

CHECKPOINT_PREFIX = "memwise-train"
LOCK_NAME = ".memwise-train.lock"
KEEP = 2
PAYLOAD_VERSION = 2
_STEP_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-step(\d+)\.pt$")

WarnCallback = Callable[[str], None]


class CheckpointError(MemwiseError):
    """No checkpoint in the directory can be read (each file and its problem are named)."""


class DirectoryLockedError(BadInputError):
    """Another live run holds the checkpoint directory."""


def checkpoint_name(steps_done: int) -> str:
    """The file name of the checkpoint written after `steps_done` steps."""
    return f"{CHECKPOINT_PREFIX}-step{steps_done:09d}.pt"


class CheckpointDirectory:
    """The checkpoint directory of one run; use as a context manager to hold its lock.

    Args:
        directory: the directory (created if missing).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._lock_fd: int | None = None

    def __enter__(self) -> "CheckpointDirectory":
        self.lock()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unlock()

    def lock(self) -> None:
        """Takes the directory's lock and removes temporary files left by a killed save.

        Raises:
            DirectoryLockedError: another live process holds it; the message names its pid.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_NAME
        while fcntl is None:
            try:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                holder = path.read_text(errors="replace").strip() if path.exists() else ""
                if not holder.isdigit() or _alive(int(holder)):  # no pid yet: its holder is writing it
                    raise self._locked_error(holder or "unknown") from None
                path.unlink(missing_ok=True)  # a stale lock: its process is gone
        while fcntl is not None:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(descriptor)
                raise self._locked_error(holder) from None
            # the previous holder may have removed the file between our open and our flock
            try:
                same_file = os.stat(path).st_ino == os.fstat(descriptor).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(descriptor)
        os.ftruncate(descriptor, 0)
        os.lseek(descriptor, 0, os.SEEK_SET)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._lock_fd = descriptor
        for orphan in self.directory.glob(f".{CHECKPOINT_PREFIX}-*.tmp"):
            orphan.unlink(missing_ok=True)

    def _locked_error(self, holder: str) -> DirectoryLockedError:
        return DirectoryLockedError(
            f"checkpoint_dir: {str(self.directory)!r} is in use by another memwise train run (pid {holder}); "
            "wait for it to finish or use another --checkpoint-dir"
        )

    def unlock(self) -> None:
        """Releases the lock (and removes the lock file); safe to call twice."""
        if self._lock_fd is None:
            return
        (self.directory / LOCK_NAME).unlink(missing_ok=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def checkpoints(self) -> list[Path]:
        """The checkpoint files, newest (most steps) first."""
        found = [(int(match.group(1)), path) for path in self.directory.glob(f"{CHECKPOINT_PREFIX}*.pt")
                 if (match := _STEP_NAME.match(path.name))]
        return [path for _, path in sorted(found, reverse=True)]

    def remove_all(self) -> None:
        """Deletes every checkpoint (for a run started over with --overwrite)."""
        for path in self.checkpoints():
            path.unlink(missing_ok=True)

    def save(self, payload: dict[str, Any], steps_done: int) -> Path:
        """Writes `payload` atomically as the checkpoint after `steps_done` steps; keeps the newest two."""
        self._require_lock()
        target = write_atomic_with(self.directory / checkpoint_name(steps_done), lambda handle: torch.save(payload, handle))
        _fsync_directory(self.directory)
        for old in self.checkpoints()[KEEP:]:
            old.unlink(missing_ok=True)
        return target

    def load_latest(self, warn: WarnCallback) -> tuple[dict[str, Any], Path]:
        """Reads the newest checkpoint that is whole; a damaged newer one is renamed `*.corrupt` with a warning.

        Raises:
            BadInputError: the directory holds no checkpoint.
            CheckpointError: no checkpoint can be read; the message names each file and its problem.
        """
        self._require_lock()
        candidates = self.checkpoints()
        if not candidates:
            raise BadInputError(
                f"--resume: no checkpoint ({CHECKPOINT_PREFIX}-step*.pt) in {str(self.directory)!r}; run without --resume first"
            )
        problems = []
        for path in candidates:
            try:
                payload = read_checkpoint(path)
            except CheckpointError as error:
                problems.append((path, str(error)))
                continue
            for bad, reason in problems:
                corrupt = bad.with_name(bad.name + ".corrupt")
                os.replace(bad, corrupt)
                warn(f"checkpoint {str(bad)!r} is damaged ({reason}); kept as {corrupt.name}, resuming from {str(path)!r}")
            return payload, path
        listing = "; ".join(f"{str(path)!r}: {reason}" for path, reason in problems)
        raise CheckpointError(f"--resume: no readable checkpoint in {str(self.directory)!r}: {listing}")

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError("CheckpointDirectory: take the lock (use it as a context manager) before reading or writing")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Loads one checkpoint file and checks it is a memwise training checkpoint of this version.

    Raises:
        CheckpointError: the file is truncated, not a torch file, or not a memwise checkpoint.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated zip, garbage bytes, unpickling errors: all mean "damaged"
        raise CheckpointError(f"cannot be read: {type(error).__name__}: {error}") from None
    if not isinstance(payload, dict) or payload.get("version") != PAYLOAD_VERSION:
        version = payload.get("version") if isinstance(payload, dict) else None
        raise CheckpointError(f"is not a memwise training checkpoint of version {PAYLOAD_VERSION} (version {version!r})")
    return payload


def _alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def _fsync_directory(directory: Path) -> None:
    """Makes the rename of a new checkpoint durable (POSIX keeps directory entries in the directory's own data)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
