"""`compress`: the smallest (or fastest) model whose metric drops at most what the user allows.

The search, in order, each step one or more evaluated trials:

1. quantize the original: static int8 (conv nets), dynamic int8 of Linear/LSTM layers (plus int8
   embedding tables when embeddings weigh), torchao int8 weight-only; when dynamic int8 fails the
   guard, the layers most sensitive to it (measured one at a time) move to per-token int8;
2. structured pruning: a sensitivity scan (each layer pruned alone at 25/50/75%), then all layers
   at the largest ratio each tolerates, recovered by distillation when the pruning costs metric,
   backed off by half while the guard fails; the pruned model is then quantized as in step 1;
   attention heads (BERT-style self-attention) the same way, scanned at 25/50% of each layer's heads;
3. unstructured magnitude pruning at 50/70/90% (masked distillation), stored sparse.

Every trial is evaluated on the workload's held-out metric and timed side by side with the
original; the best trial meeting the guard wins (by size or batch-32 latency, the other axis
breaking ties within 2%). The budget stops new steps, never a running trial.
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memwise.compress import distill as distill_module
from memwise.compress import prune_structured, prune_unstructured, quantize
from memwise.compress.load import MODEL_FILE, deserialize, save_compressed, serialize
from memwise.compress.measure import latency_side_by_side
from memwise.compress.quantize import MethodSkipped
from memwise.compress.result import (
    FLAG_FAILS_GUARD,
    FLAG_SAVES_NOTHING,
    FLAG_SLOWER,
    AppliedMethod,
    CompressionResult,
    Method,
    ModelStats,
    Objective,
    SkippedMethod,
    Trial,
)
from memwise.compress.target import CompressTarget, target_from_workload
from memwise.core.checks import positive_int
from memwise.core.errors import BadInputError
from memwise.core.workload import Workload
from memwise.report.atomic import write_atomic

DEFAULT_BUDGET_S = 540.0
LATENCY_BATCHES = (1, 32)
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
DISTILL_STEPS = 300
SPARSITIES = (0.5, 0.7, 0.9)
PER_TOKEN_COUNTS = (2, 4, 8)
Progress = Callable[[int, int, str], None]


@dataclasses.dataclass
class _Candidate:
    trial: Trial
    model: nn.Module
    data: bytes


class _Search:
    def __init__(
        self,
        target: CompressTarget,
        max_metric_drop: float,
        objective: Objective,
        methods: set[Method],
        budget_s: float,
        progress: Progress | None,
        distill_steps: int,
    ) -> None:
        self.target = target
        self.distill_steps = distill_steps
        self.distill_step_s: float | None = None
        self.max_metric_drop = max_metric_drop
        self.objective = objective
        self.methods = methods
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.progress = progress
        self.steps_done = 0
        self.steps_total = 1
        self.candidates: list[_Candidate] = []
        self.skipped: list[SkippedMethod] = []
        self.original = target.model
        self.latency_batches = {f"batch_{size}": target.inputs(size) for size in LATENCY_BATCHES}
        evaluate_started = time.monotonic()
        self.original_metric = float(target.evaluate(self.original))
        self.evaluate_s = time.monotonic() - evaluate_started
        self.original_bytes = serialize(self.original)

    # --- bookkeeping -------------------------------------------------------------------------
    def time_left(self) -> bool:
        return time.monotonic() < self.deadline

    def tick(self, label: str) -> bool:
        self.steps_done += 1
        self.steps_total = max(self.steps_total, self.steps_done + 1)
        if self.progress is not None:
            self.progress(self.steps_done, self.steps_total, label)
        return self.time_left()

    def skip(self, method: str, reason: str) -> None:
        self.skipped.append(SkippedMethod(method=method, reason=reason))

    def trial(self, label: str, applied: list[AppliedMethod], model: nn.Module, *, sparse: bool = False) -> _Candidate:
        started = time.monotonic()
        model.eval()
        data = serialize(model, sparse=sparse, metadata={"methods": [dataclasses.asdict(item) for item in applied]})
        metric = float(self.target.evaluate(model))
        latency = latency_side_by_side({"original": self.original, "candidate": model}, self.latency_batches, target_s=1.0)
        drop = self.original_metric - metric
        accepted = drop <= self.max_metric_drop + 1e-9
        flags = []
        if len(data) >= len(self.original_bytes):
            flags.append(FLAG_SAVES_NOTHING)
        if latency["candidate"]["batch_32"] > latency["original"]["batch_32"]:
            flags.append(FLAG_SLOWER)
        if not accepted:
            flags.append(FLAG_FAILS_GUARD)
        trial = Trial(
            method=label, methods=applied, size_bytes=len(data), latency_ms=latency["candidate"],
            original_latency_ms=latency["original"], metric=metric, metric_drop=drop, accepted=accepted,
            flags=flags, elapsed_s=time.monotonic() - started,
        )
        candidate = _Candidate(trial=trial, model=model, data=data)
        self.candidates.append(candidate)
        self.tick(label)
        return candidate

    # --- steps ---------------------------------------------------------------------------------
    def quantize_variants(self, model: nn.Module, prefix: list[AppliedMethod], label_prefix: str, *, first_always: bool = False) -> list[_Candidate]:
        """Trials of every applicable quantization of `model`; returns them.

        `first_always`: the first applicable variant runs even when the budget is spent (the
        quantization of a pruned model finishes the pruning step).
        """
        out: list[_Candidate] = []
        has_conv = any(isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for module in model.modules())
        has_linear = bool(quantize.linear_names(model)) or any(isinstance(module, (nn.LSTM, nn.GRU)) for module in model.modules())
        embeddings = quantize.embedding_parameters(model)
        with_embeddings = embeddings >= 0.05 * prune_structured.parameter_count(model)
        calibration = [self.target.inputs(64) for _ in range(4)]

        def finish(candidate_model: nn.Module) -> tuple[nn.Module, list[AppliedMethod]]:
            if with_embeddings:
                return quantize.quantize_embeddings_int8(candidate_model), [AppliedMethod(name="int8_embedding", params={"scale": "per-row absmax"})]
            return candidate_model, []

        if has_conv and (self.time_left() or first_always):
            try:
                static = quantize.quantize_static_int8(model, calibration, calibration[0])
                out.append(self.trial(f"{label_prefix}static_int8", prefix + [AppliedMethod(name="static_int8", params={"backend": "x86", "calibration_batches": len(calibration), "qconfig": "per-channel weights, histogram activations"})], static))
            except MethodSkipped as error:
                self.skip("quantize:static_int8", str(error))
        if has_linear and (self.time_left() or (first_always and not has_conv)):
            full_range = quantize.cpu_has_vnni()
            dynamic, extra = finish(quantize.quantize_dynamic_int8(model, full_range=full_range))
            applied = prefix + [AppliedMethod(name="dynamic_int8", params={"weights": "per-channel int8", "activations": "per-tensor uint8, 8-bit" if full_range else "per-tensor uint8, 7-bit"})] + extra
            first = self.trial(f"{label_prefix}dynamic_int8", applied, dynamic)
            out.append(first)
            if not first.trial.accepted and self.time_left():
                out.extend(self.per_token_fallback(model, prefix, label_prefix, full_range, finish))
        if has_linear and self.time_left() and not has_conv:
            try:
                torchao_model, extra = finish(quantize.quantize_torchao_weight_only(model, bits=8))
                out.append(self.trial(f"{label_prefix}torchao_int8_weight_only", prefix + [AppliedMethod(name="torchao_int8_weight_only", params={})] + extra, torchao_model))
            except MethodSkipped as error:
                self.skip("quantize:torchao_int8_weight_only", str(error))
            try:
                quantize.quantize_torchao_weight_only(model, bits=4)
            except MethodSkipped as error:
                self.skip("quantize:torchao_int4_weight_only", str(error))
        return out

    def per_token_fallback(self, model: nn.Module, prefix: list[AppliedMethod], label_prefix: str, full_range: bool,
                           finish: Callable[[nn.Module], tuple[nn.Module, list[AppliedMethod]]]) -> list[_Candidate]:
        """Moves the Linear layers most sensitive to dynamic int8 to per-token int8, most sensitive first."""
        names = quantize.linear_names(model)
        drops = {}
        for name in names:
            if not self.time_left():
                break
            single = _only_one_dynamic(model, name, full_range)
            drops[name] = self.original_metric - float(self.target.evaluate(single))
        ranked = sorted(drops, key=drops.get, reverse=True)
        out = []
        for count in PER_TOKEN_COUNTS:
            if not self.time_left() or count > len(ranked):
                break
            chosen = ranked[:count]
            dynamic, extra = finish(quantize.quantize_dynamic_int8(model, per_token=chosen, full_range=full_range))
            applied = prefix + [AppliedMethod(name="dynamic_int8", params={"weights": "per-channel int8", "per_token_layers": chosen})] + extra
            candidate = self.trial(f"{label_prefix}dynamic_int8+per_token_{count}", applied, dynamic)
            out.append(candidate)
            if candidate.trial.accepted:
                break
        return out

    def structured(self) -> None:
        example = self.target.inputs(2)
        layers_upper_bound = sum(isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) for module in self.original.modules())
        # The scan evaluates each candidate at 3 ratios; a third of the layers is a typical candidate count.
        if not self.scan_fits("prune", "the sensitivity scan", self.evaluate_s * len(prune_structured.SCAN_RATIOS) * max(1, layers_upper_bound // 3)):
            return
        try:
            layers = prune_structured.candidate_layers(self.original, example, time_left=self.time_left)
        except MethodSkipped as error:
            self.skip("prune", str(error))
            return
        if not layers:
            self.skip("prune", "no layer can lose channels without changing the model's output shape")
            return
        self.steps_total += len(layers) * len(prune_structured.SCAN_RATIOS)
        scan = prune_structured.sensitivity_scan(
            self.original, example, self.target.evaluate, layers, on_step=lambda: self.tick("prune: sensitivity scan"),
        )
        scan_params = {item.layer: {str(ratio): drop for ratio, drop in item.drop_by_ratio.items()} for item in scan}

        def build(ratios: dict[str, float]) -> tuple[nn.Module, AppliedMethod]:
            pruned = prune_structured.prune_structured(self.original, example, ratios)
            return pruned, AppliedMethod(name="prune_structured", params={"ratios": ratios, "importance": "group L2 magnitude", "scan": scan_params})

        self.prune_trials(scan, build)

    def heads(self) -> None:
        """Attention-head pruning: a sensitivity scan (each attention layer loses 25/50% of its heads
        alone), then every layer at the largest fraction it tolerates, backed off by half while the
        guard fails, recovered and quantized as the channel pruning."""
        layers = prune_structured.attention_layers(self.original)
        if not layers:
            return
        if not self.scan_fits("prune_heads", "the attention-head sensitivity scan", self.evaluate_s * len(prune_structured.HEAD_SCAN_RATIOS) * len(layers)):
            return
        self.steps_total += len(layers) * len(prune_structured.HEAD_SCAN_RATIOS)
        scan = prune_structured.head_sensitivity_scan(
            self.original, self.target.evaluate, list(layers), on_step=lambda: self.tick("prune_heads: sensitivity scan"),
        )
        scan_params = {item.layer: {str(ratio): drop for ratio, drop in item.drop_by_ratio.items()} for item in scan}

        def build(ratios: dict[str, float]) -> tuple[nn.Module, AppliedMethod]:
            heads = prune_structured.heads_for_ratios(self.original, ratios)
            pruned = prune_structured.prune_heads(self.original, heads)
            return pruned, AppliedMethod(name="prune_heads", params={"heads_removed": heads, "heads_per_layer": layers, "importance": "L2 magnitude of q/k/v rows and output columns", "scan": scan_params})

        self.prune_trials(scan, build)

    def scan_fits(self, method: str, what: str, scan_s: float) -> bool:
        """Whether a sensitivity scan of `scan_s` seconds (plus one distillation) fits the budget left; skips `method` if not."""
        expected_s = scan_s
        if Method.DISTILL in self.methods:
            expected_s += self.distill_estimate_s(self.distill_steps)
        remaining_s = self.deadline - time.monotonic()
        if expected_s > remaining_s:
            self.skip(method, f"{what} needs about {expected_s:.0f} s ({self.evaluate_s:.1f} s per evaluation), "
                              f"{max(remaining_s, 0):.0f} s of the budget are left; raise --budget-s")
            return False
        return True

    def prune_trials(self, scan: list[prune_structured.Sensitivity], build: Callable[[dict[str, float]], tuple[nn.Module, AppliedMethod]]) -> None:
        """Prunes every scanned layer at the largest ratio it tolerates alone, halving the ratios while
        the guard fails; each pruned model is recovered by distillation when it costs metric, then quantized."""
        use_distill = Method.DISTILL in self.methods
        # With distillation as recovery a layer may cost more alone than the final guard allows.
        tolerated = self.max_metric_drop * (4.0 if use_distill else 1.0)
        ratios = prune_structured.ratios_from_scan(scan, tolerated)
        while ratios and self.time_left():
            pruned, method = build(ratios)
            if prune_structured.parameter_count(pruned) >= prune_structured.parameter_count(self.original):
                return  # the ratios round to nothing removed (e.g. a quarter of a head)
            applied = [method]
            drop = self.original_metric - float(self.target.evaluate(pruned))
            if use_distill and drop > self.max_metric_drop / 4 and self.time_left():
                distill_started = time.monotonic()
                distill_module.distill(pruned, self.original, self.target.make_labeled, steps=self.distill_steps)
                self.distill_step_s = (time.monotonic() - distill_started) / self.distill_steps
                applied.append(AppliedMethod(name="distill", params={"steps": self.distill_steps, "temperature": 4.0, "alpha": 0.7, "lr": 1e-3, "batch_size": 64}))
            base = self.trial("+".join(item.name for item in applied), applied, pruned)
            if base.trial.accepted or base.trial.metric_drop <= self.max_metric_drop * 1.5:
                if Method.QUANTIZE in self.methods:
                    self.quantize_variants(pruned, applied, base.trial.method + "+", first_always=True)
                if base.trial.accepted:
                    return
            ratios = {name: ratio / 2 for name, ratio in ratios.items() if ratio / 2 >= 0.1}

    def distill_estimate_s(self, steps: int) -> float:
        """Rough cost of `steps` distillation steps at batch 64: teacher forward, student forward and
        backward (about 4 forwards), from the batch-32 forward time measured in the first trial,
        or from the time per step of a distillation already run."""
        if self.distill_step_s is not None:
            return steps * self.distill_step_s
        if not self.candidates:
            return 0.0
        forward_s = self.candidates[0].trial.original_latency_ms["batch_32"] / 1000.0
        return steps * 2 * 4 * forward_s

    def sparse(self) -> None:
        use_distill = Method.DISTILL in self.methods
        expected_s = len(SPARSITIES) * (self.evaluate_s + (self.distill_estimate_s(self.distill_steps // 2) if use_distill else 0.0))
        remaining_s = self.deadline - time.monotonic()
        if expected_s > remaining_s:
            self.skip("sparse", f"magnitude pruning with distillation recovery needs about {expected_s:.0f} s, "
                                f"{max(remaining_s, 0):.0f} s of the budget are left; raise --budget-s")
            return
        for sparsity in SPARSITIES:
            if not self.time_left():
                break

            def recover(model: nn.Module) -> None:
                if use_distill:
                    distill_module.distill(model, self.original, self.target.make_labeled, steps=self.distill_steps // 2)

            pruned = prune_unstructured.prune_magnitude(self.original, sparsity, recover=recover)
            applied = [AppliedMethod(name="prune_unstructured", params={"sparsity": sparsity, "criterion": "global L1"})]
            if use_distill:
                applied.append(AppliedMethod(name="distill", params={"steps": self.distill_steps // 2, "temperature": 4.0, "alpha": 0.7}))
            applied.append(AppliedMethod(name="sparse_storage", params={"format": "CSR int32 indices where smaller"}))
            candidate = self.trial(f"sparse_{int(sparsity * 100)}", applied, pruned, sparse=True)
            if not candidate.trial.accepted:
                break

    def best(self) -> tuple[_Candidate | None, bool]:
        accepted = [candidate for candidate in self.candidates if candidate.trial.accepted]
        if accepted:
            return min(accepted, key=self._rank), True
        if not self.candidates:
            return None, False
        return min(self.candidates, key=lambda candidate: candidate.trial.metric_drop), False

    def _rank(self, candidate: _Candidate) -> tuple[float, float]:
        trial = candidate.trial
        latency_ratio = trial.latency_ms["batch_32"] / trial.original_latency_ms["batch_32"]
        size_bucket = math.floor(math.log(trial.size_bytes) / math.log(1.02))
        latency_bucket = math.floor(math.log(latency_ratio) / math.log(1.02))
        if self.objective is Objective.SIZE:
            return (size_bucket, latency_ratio)
        return (latency_bucket, trial.size_bytes)


def _only_one_dynamic(model: nn.Module, name: str, full_range: bool) -> nn.Module:
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    single = copy.deepcopy(model).eval()
    with quantize._quiet_ao():
        single = quantize_dynamic(single, {name: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    for module in single.modules():
        if type(module) is quantize.nnqd.Linear:
            module.__class__ = quantize.FullRangeDynamicLinear
            module.reduce_range = not full_range
    return single


def parse_methods(methods: Iterable[str] | str | None) -> set[Method]:
    """The methods named (a list or comma-separated string); None means all."""
    if methods is None:
        return set(Method)
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    valid = ", ".join(method.value for method in Method)
    parsed = set()
    for item in items:
        item = str(item).strip()
        try:
            parsed.add(Method(item))
        except ValueError:
            raise BadInputError(f"methods: unknown method {item!r}; valid methods are {valid}") from None
    if not parsed:
        raise BadInputError(f"methods: name at least one of {valid}")
    return parsed


def compress(
    workload: Workload | str,
    max_metric_drop: float,
    objective: Objective | str = Objective.SIZE,
    methods: Iterable[str] | str | None = None,
    budget_s: float | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    force: bool = False,
    weights: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    distill_steps: int = DISTILL_STEPS,
) -> CompressionResult:
    """Searches compressions of a trained model and keeps the best whose metric drops at most `max_metric_drop`.

    Args:
        workload: a Workload with `evaluate`, or a workload spec (`digits-cnn`, `minilm`, `file.py:fn`).
        max_metric_drop: the largest allowed drop of `evaluate` from the original, in [0, 1]
            (0.01 = one accuracy point, or 0.01 of cosine similarity).
        objective: "size" (smallest saved file) or "latency" (fastest at batch 32).
        methods: any of "prune", "quantize", "distill", "sparse" (default all).
        budget_s: seconds after which no new search step starts (default 540).
        out: directory to write `model.pt`, `report.json` and `report.html` into.
        force: replace those files when `out` exists.
        weights: a state dict file to load into the workload's model (a user's trained weights).
        progress: `progress(done, total, label)` after each evaluated step.
        distill_steps: Adam steps of each distillation recovery (the sparse step uses half).

    Returns:
        A CompressionResult. `feasible` is False when no candidate met the guard; `compressed` is
        then the candidate with the smallest drop, and nothing is saved.

    Raises:
        BadInputError: a bad argument, an existing `out` without `force`, a workload without
            `evaluate`, or an untrained model.

    Assumptions:
        Latency is CPU forward time on the workload's own batches of 1 and 32 samples, median of
        interleaved rounds with the original, with torch's current thread count.
    """
    check_arguments(max_metric_drop, out, force)
    try:
        objective = Objective(objective)
    except ValueError:
        raise BadInputError(f"objective: must be one of {', '.join(item.value for item in Objective)}, got {objective!r}") from None
    method_set = parse_methods(methods)
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or budget_s <= 0):
        raise BadInputError(f"budget_s: must be a positive number of seconds, got {budget_s!r}")
    out_dir = Path(out) if out is not None else None
    if isinstance(workload, str):
        from memwise.workloads import load_workload

        workload = load_workload(workload)
    target = target_from_workload(workload, weights=weights)

    with torch.no_grad():
        search = _Search(target, float(max_metric_drop), objective, method_set, float(budget_s or DEFAULT_BUDGET_S), progress, positive_int(distill_steps, "distill_steps"))
    skipped_methods = {Method.DISTILL} if method_set == {Method.DISTILL} else set()
    if skipped_methods:
        search.skip("distill", "distillation is a recovery step: add prune or sparse to --methods")
    if Method.QUANTIZE in method_set:
        search.quantize_variants(search.original, [], "", first_always=True)
    if Method.PRUNE in method_set:
        if search.time_left():
            search.structured()
        else:
            search.skip("prune", "budget spent before this step")
        if search.time_left():
            search.heads()
        elif prune_structured.attention_layers(search.original):
            search.skip("prune_heads", "budget spent before this step")
    if Method.SPARSE in method_set:
        if search.time_left():
            search.sparse()
        else:
            search.skip("sparse", "budget spent before this step")
    best, feasible = search.best()
    if best is None:
        raise BadInputError("compress: no method could run on this model; see the skipped methods: " + "; ".join(f"{item.method}: {item.reason}" for item in search.skipped))

    final = latency_side_by_side({"original": search.original, "candidate": best.model}, search.latency_batches, target_s=3.0)
    original = ModelStats(size_bytes=len(search.original_bytes), metric=search.original_metric, latency_ms=final["original"])
    compressed = ModelStats(size_bytes=best.trial.size_bytes, metric=best.trial.metric, latency_ms=final["candidate"])
    path = None
    reloaded_metric = None
    result_fields: dict[str, Any] = dict(
        workload=target.name, objective=objective, max_metric_drop=float(max_metric_drop), feasible=feasible,
        original=original, compressed=compressed, size_ratio=compressed.size_bytes / original.size_bytes,
        latency_ratio=compressed.latency_ms["batch_32"] / original.latency_ms["batch_32"],
        metric_drop=best.trial.metric_drop, methods=best.trial.methods, trials=[item.trial for item in search.candidates],
        skipped=search.skipped, search_s=time.monotonic() - search.started,
        measured_on=f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}",
    )
    if feasible and out_dir is not None:
        reloaded = deserialize(best.data)
        reloaded_metric = float(target.evaluate(reloaded))
        path = str(out_dir / MODEL_FILE)
        result = CompressionResult(**result_fields, path=path, reloaded_metric=reloaded_metric)
        _write_outputs(out_dir, best.data, result)
        return result
    return CompressionResult(**result_fields, path=path, reloaded_metric=reloaded_metric)


def check_arguments(max_metric_drop: Any, out: str | os.PathLike[str] | None, force: bool) -> None:
    """Rejects a metric drop outside [0, 1] and an existing `out` without `force` (before any work)."""
    if isinstance(max_metric_drop, bool) or not isinstance(max_metric_drop, (int, float)) or not 0 <= max_metric_drop <= 1:
        raise BadInputError(f"max_metric_drop: must be a number in [0, 1] (e.g. 0.01 for one accuracy point), got {max_metric_drop!r}")
    if out is None:
        return
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"--out: {str(out_dir)!r} exists and is not a directory; choose another --out directory")
    if out_dir.exists() and not force:
        raise BadInputError(f"--out: {str(out_dir)!r} already exists; pass --force to replace its model.pt and reports, or choose another directory")


def _write_outputs(out_dir: Path, model_bytes: bytes, result: CompressionResult) -> None:
    from memwise.compress.report import render_html

    report_json = (json.dumps(result.to_dict(), indent=2) + "\n").encode("utf-8")
    report_html = render_html(result).encode("utf-8")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_compressed(out_dir / MODEL_FILE, model_bytes)
    write_atomic(out_dir / REPORT_JSON, report_json)
    write_atomic(out_dir / REPORT_HTML, report_html)

