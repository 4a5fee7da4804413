"""`CompressionResult`: what a compression search tried, what it kept, and what each step really saved."""

import dataclasses
import enum
from typing import Any

from memwise.core.serialize import from_dict, to_dict


class Objective(str, enum.Enum):
    """What the search minimizes among the candidates that meet the metric guard."""

    SIZE = "size"
    LATENCY = "latency"


class Method(str, enum.Enum):
    """The method families `--methods` names."""

    PRUNE = "prune"
    QUANTIZE = "quantize"
    DISTILL = "distill"
    SPARSE = "sparse"


# Flags a trial row can carry; a saving that is not one is reported, not hidden.
FLAG_SAVES_NOTHING = "saves nothing"
FLAG_SLOWER = "slower"
FLAG_FAILS_GUARD = "fails guard"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelStats:
    """One model as measured: saved-file size, metric, CPU latency per batch size.

    `latency_ms` maps "batch_1" and "batch_32" to the median forward time in milliseconds.
    """

    size_bytes: int
    metric: float
    latency_ms: dict[str, float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AppliedMethod:
    """One method applied to produce a model, with its parameters."""

    name: str
    params: dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Trial:
    """One evaluated candidate.

    `latency_ms` and `original_latency_ms` were measured side by side, interleaved, in one run, so
    their ratio is meaningful even on a busy machine. `size_bytes` is the length of the file
    `save_compressed` would write for this candidate. `flags` lists "saves nothing" (not smaller
    than the original on disk), "slower" (batch-32 latency above the original's) and "fails guard".
    """

    method: str
    methods: list[AppliedMethod]
    size_bytes: int
    latency_ms: dict[str, float]
    original_latency_ms: dict[str, float]
    metric: float
    metric_drop: float
    accepted: bool
    flags: list[str]
    elapsed_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkippedMethod:
    """A method the search did not try, and why (absent package, unsupported model, budget)."""

    method: str
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressionResult:
    """The outcome of `memwise.compress`.

    `compressed` is the best candidate found: the best one meeting the guard when `feasible`, else
    the one with the smallest metric drop (reported, not saved as a success). `size_ratio` is
    compressed/original saved-file size (0.125 = 8x smaller); `latency_ratio` is compressed/original
    batch-32 latency from the final side-by-side measurement. `reloaded_metric` is the metric of
    the model read back from `path` (None when nothing was saved).
    """

    workload: str
    objective: Objective
    max_metric_drop: float
    feasible: bool
    original: ModelStats
    compressed: ModelStats
    size_ratio: float
    latency_ratio: float
    metric_drop: float
    methods: list[AppliedMethod]
    trials: list[Trial]
    skipped: list[SkippedMethod]
    path: str | None
    reloaded_metric: float | None
    search_s: float
    measured_on: str

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CompressionResult":
        result = from_dict(cls, data)
        # core.serialize builds nested dataclasses but leaves the items of a list as dicts.
        trials = [_item(Trial, trial) for trial in result.trials]
        trials = [dataclasses.replace(trial, methods=[_item(AppliedMethod, item) for item in trial.methods]) for trial in trials]
        return dataclasses.replace(
            result,
            methods=[_item(AppliedMethod, item) for item in result.methods],
            trials=trials,
            skipped=[_item(SkippedMethod, item) for item in result.skipped],
        )


def _item(cls: type, value: Any) -> Any:
    return value if isinstance(value, cls) else from_dict(cls, value, where=cls.__name__)
