"""`launch_train`: run `memwise train` on N local ranks through torchrun, and report a failure by rank."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError, MemwiseError
from memwise.distributed.config import DistributedTrainConfig
from memwise.distributed.result import DistributedProfile, DistributedTrainResult
from memwise.distributed.worker import error_path


class RankFailedError(MemwiseError):
    """A rank of a distributed run failed; `rank` and `cause` say which and why."""

    def __init__(self, message: str, rank: int | None, cause: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.cause = cause


class RankBadInputError(RankFailedError, BadInputError):
    """A rank rejected the run's input (e.g. FSDP on a model without blocks): CLI exit code 2."""


def check_nproc(nproc: int, device: str, cuda_device_count: int | None = None) -> None:
    """Rejects `nproc` above the CUDA devices there are (one GPU per rank); on CPU any positive count works."""
    positive_int(nproc, "nproc")
    if device == "cuda":
        if cuda_device_count is None:
            import torch

            cuda_device_count = torch.cuda.device_count()
        if nproc > cuda_device_count:
            raise BadInputError(f"--nproc: {nproc} ranks need {nproc} CUDA devices, this machine has {cuda_device_count}; "
                                f"use --nproc {max(cuda_device_count, 1)} or fewer, or --device cpu")


def torchrun_command(config_path: Path, nproc: int) -> list[str]:
    """The torchrun command line that starts `nproc` workers on this machine (`--standalone`: a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "memwise.distributed", str(config_path)]


def launch_train(
    config: DistributedTrainConfig, nproc: int, *, log: Callable[[str], None] | None = None,
) -> DistributedTrainResult | DistributedProfile:
    """Runs `config` on `nproc` ranks of this machine through torchrun and returns rank 0's result
    (a `DistributedProfile` when `config.task` is `profile`).

    Worker output goes to `log` (default: this process's stderr), never to stdout. When a rank
    fails, torchrun stops the others; this raises `RankFailedError` naming the first failed rank
    and its cause (its exception, or the signal or exit code that ended it), after making sure no
    process of the run is left. Checkpoints are written atomically by each rank, so the last
    complete one stays intact.

    Raises:
        BadInputError: `nproc` is not positive or above the CUDA devices (device cuda).
        RankFailedError: a rank failed (`RankBadInputError` when it rejected the input).
    """
    check_nproc(nproc, config.device)
    log = log or (lambda line: print(line, file=sys.stderr, end=""))
    with tempfile.TemporaryDirectory(prefix="memwise-dist-") as directory:
        result_path = Path(directory) / "result.json"
        config = DistributedTrainConfig.from_dict({**config.to_dict(), "result_path": str(result_path)})
        config_path = Path(directory) / "config.json"
        config_path.write_text(json.dumps(config.to_dict()))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        process = subprocess.Popen(torchrun_command(config_path, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=_relay, args=(process.stdout, lines, log), daemon=True)
        reader.start()
        try:
            returncode = process.wait()
        except BaseException:
            _stop_group(process)
            raise
        finally:
            reader.join(timeout=10)
            _stop_group(process)  # torchrun reaps its workers; this catches any left behind
        if returncode != 0 or not result_path.exists():
            raise _failure(config, nproc, "".join(lines), returncode)
        result_type = DistributedProfile if config.task == "profile" else DistributedTrainResult
        return result_type.from_dict(json.loads(result_path.read_text()))


def _relay(stream, lines: list[str], log: Callable[[str], None]) -> None:
    for line in stream:
        lines.append(line)
        log(line)


def _stop_group(process: subprocess.Popen) -> None:
    """Ends every process left in the run's session: SIGTERM, then SIGKILL after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(process.pid):
            break


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _failure(config: DistributedTrainConfig, nproc: int, output: str, returncode: int) -> RankFailedError:
    """The first failure: torchrun's root cause names the rank; its own report (if any) says why."""
    root = output[output.find("Root Cause"):] if "Root Cause" in output else output
    rank_match = re.search(r"rank\s*:\s*(\d+)", root)
    exit_match = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    signal_match = re.search(r"Signal (\d+) \((SIG\w+)\)", root)
    reports = {}
    for rank in range(nproc):
        path = error_path(config.result_path, rank)
        if path is not None and path.exists():
            reports[rank] = json.loads(path.read_text())
    rank = int(rank_match.group(1)) if rank_match else (min(reports) if reports else None)
    report = reports.get(rank)
    if report is not None:
        cause = f"{report['type']}: {report['message']}"
        error_type = RankBadInputError if report.get("bad_input") else RankFailedError
        return error_type(f"rank {rank} failed: {cause}; the other ranks were stopped", rank, cause)
    if signal_match:  # killed, or os._exit: no report of its own
        cause = f"killed by signal {signal_match.group(2)}"
        native = [line.strip() for line in output.splitlines() if re.match(r"\s*(terminate called|what\(\):|Fatal Python error)", line)]
        if native:  # a C++ abort says why on stderr before the signal
            cause += f" ({'; '.join(dict.fromkeys(native))})"
    elif exit_match and int(exit_match.group(1)) < 0:
        cause = f"killed by signal {signal.Signals(-int(exit_match.group(1))).name}"
    elif exit_match:
        cause = f"exited with code {exit_match.group(1)}"
    else:
        cause = f"torchrun exited with code {returncode}"
    where = f"rank {rank}" if rank is not None else "a rank"
    return RankFailedError(f"{where} failed: {cause}; the other ranks were stopped", rank, cause)
