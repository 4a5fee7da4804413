"""Estimating the memory of `model.generate` without running it: the real generation loop on fake tensors.

The transformers `generate` loop runs as it is (prefill, then one forward per new token, with the
cache class transformers picks) on a copy of the model whose weights are fake tensors, under the
same allocation accounting as `fake_run` (an allocation per new storage, a free when it dies,
scratch of opaque CPU kernels from real single-op probes). Nothing of the size of the model is
allocated, so a 7B model at a long context is estimated in seconds.

`generate` reads a few tensor values to steer its loop (`.item()`); fake tensors have none. They
are answered from what produced the tensor, for a prompt without padding and with the
end-of-sequence token switched off: `all(...)` (the mask is all ones) is true, `any(...)` (any
padding, any negative id) is false, and the stop check (`unfinished.max() == 0`) is true exactly
after the last new token.
"""

import dataclasses
import itertools
import weakref
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memwise.core.errors import BadInputError, SymbolicExecutionError
from memwise.core.units import format_bytes
from memwise.core.workload import Workload
from memwise.estimate.fake_run import FakeAllocations, fake_model
from memwise.estimate.op_probe import OpProbe
from memwise.measure.generate import (
    KV_DTYPE_BYTES,
    CacheKind,
    GenerationMemory,
    GenerationShape,
    GenerationWhatIf,
    KvCacheDtype,
    causal_lm,
    forward_phases,
    generate_kwargs,
    kv_cache_layout,
    prompt,
    use_cache,
    vocab_size_of,
    _prefill_logits_bytes,
)
from memwise.measure.memory_log import MemoryLog
from memwise.measure.tracker import module_names, persistent_tensors

_ITEM = torch.ops.aten._local_scalar_dense.default
_ANSWERS = {"all": True, "any": False}


class _GenerateAllocations(FakeAllocations):
    """`FakeAllocations` that answers `generate`'s `.item()` calls (see the module docstring)."""

    def __init__(self, log: MemoryLog, *, probe: OpProbe | None, new_tokens: int) -> None:
        super().__init__(log, round_size=lambda nbytes: nbytes, probe=probe)
        self.new_tokens = new_tokens
        self.stop_checks = 0
        self.producers: dict[int, tuple[weakref.ref, str]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is _ITEM and args[0].dtype == torch.bool:
            return self._answer(func, args[0])
        output = super().__torch_dispatch__(func, types, args, kwargs)
        if isinstance(output, torch.Tensor) and output.dtype == torch.bool and output.dim() == 0:
            self.producers[id(output)] = (weakref.ref(output), func._opname)
        return output

    def _answer(self, func: Any, tensor: torch.Tensor) -> bool:
        known = self.producers.get(id(tensor))
        producer = known[1] if known is not None and known[0]() is tensor else None
        if producer in _ANSWERS:
            return _ANSWERS[producer]
        if producer == "eq":  # the stop check, once per new token
            self.stop_checks += 1
            return self.stop_checks >= self.new_tokens
        raise self._error(func, f"reads a boolean made by {producer or 'an unknown op'} that memwise cannot answer")


def _fake_generate_log(workload: Workload, shape: GenerationShape, probe: OpProbe | None) -> MemoryLog:
    model = causal_lm(workload)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = fake_model(model, fake_mode).eval()
    log = MemoryLog(mode="infer", module_names=module_names(fake))
    recorder = _GenerateAllocations(log, probe=probe, new_tokens=shape.new_tokens)
    for tensor, category, owner in persistent_tensors(fake):
        recorder.track_preexisting(tensor, category, owner)
    kwargs = generate_kwargs(shape, fake)
    real_inputs = prompt(shape, vocab_size_of(fake))
    with torch.no_grad(), use_cache(fake), fake_mode:
        inputs = {name: fake_mode.from_tensor(tensor) for name, tensor in real_inputs.items()}
        # The prompt is made before generate starts and is not logged, as in a measured run, and
        # generate's own set-up before the prefill belongs to the run, not to the baseline.
        log.phase("idle", 0)
        with forward_phases(fake, lambda phase, step: log.phase(phase, step)), recorder:
            output = fake.generate(**inputs, **kwargs)
    if output.shape[1] != shape.context_length + shape.new_tokens:
        raise SymbolicExecutionError(f"fake generate made {output.shape[1] - shape.context_length} tokens, expected {shape.new_tokens}")
    return log


def _peak(workload: Workload, shape: GenerationShape, probe: OpProbe | None) -> tuple[int, str, int, int]:
    breakdown = _fake_generate_log(workload, shape, probe).summarize()
    return breakdown.peak_bytes, breakdown.phase_at_peak, breakdown.step_at_peak, breakdown.baseline_bytes


def estimate_generation(
    workload: Workload,
    shape: GenerationShape,
    *,
    kv_cache_dtype: KvCacheDtype | str = KvCacheDtype.MODEL,
    budget_bytes: int | None = None,
    what_ifs: bool = True,
) -> GenerationMemory:
    """Predicts the peak memory of `model.generate` (greedy, exactly `shape.new_tokens` tokens) on the CPU.

    Args:
        workload: an `hf:` causal LM (GPT-2, Llama, Mistral, Qwen2, ...); weights may be on `meta`.
        shape: batch size, prompt length, new tokens and cache class.
        kv_cache_dtype: `bf16`, `fp8` or `int8` to price a quantized cache (see Assumptions).
        budget_bytes: a budget to check; also finds `max_batch_size`, the most sequences that fit.
        what_ifs: also estimate a quantized cache, a static cache, half the context, half the
            batch and a quarter of the new tokens.

    Returns:
        A `GenerationMemory` with `source="estimated"` (bytes).

    Assumptions:
        The prompt has no padding. A quantized cache is priced by scaling the cache's bytes at the
        peak by the element size (transformers' quantized caches also keep a short residual window
        in the model's dtype and dequantize one layer at a time; neither is counted).

    Known limitations:
        CPU allocator only (no CUDA caching-allocator rounding); beam search and sampling are not
        modelled (greedy only).
    """
    import transformers

    if not isinstance(workload, Workload):
        raise BadInputError(f"workload: expected a memwise.Workload, got {type(workload).__name__}")
    try:
        kv_cache_dtype = KvCacheDtype(kv_cache_dtype)
    except ValueError:
        raise BadInputError(f"kv_cache_dtype: invalid value {kv_cache_dtype!r}; valid values are bf16, fp8, int8") from None
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0):
        raise BadInputError(f"budget_bytes: expected a positive number of bytes, got {budget_bytes!r}")
    model = causal_lm(workload)
    layout = kv_cache_layout(model)
    probe = OpProbe(max_probe_bytes=64 * 2**20)
    peak, phase, step, weight_bytes = _peak(workload, shape, probe)
    notes = []
    if kv_cache_dtype is not KvCacheDtype.MODEL:
        peak -= _quantized_cache_saving(layout, shape, phase, step, kv_cache_dtype)
        notes.append(f"KV cache in {kv_cache_dtype.value}: the cache's bytes at the peak scaled by the element size "
                     "(residual window and per-layer dequantization of quantized caches not counted)")
    changes = []
    if what_ifs:
        changes = _what_ifs(workload, shape, kv_cache_dtype, layout, probe, peak, phase, step, budget_bytes)
    max_batch = _max_batch_size(workload, shape, kv_cache_dtype, layout, probe, budget_bytes) if budget_bytes is not None else None
    return GenerationMemory(
        source="estimated", workload=workload.name, batch_size=shape.batch_size, context_length=shape.context_length,
        new_tokens=shape.new_tokens, cache=shape.cache, kv_cache_dtype=kv_cache_dtype, peak_bytes=peak, phase_at_peak=phase,
        step_at_peak=step, weight_bytes=weight_bytes,
        kv_cache_bytes=layout.bytes_per_token(_dtype_bytes(layout, kv_cache_dtype)) * shape.batch_size * (shape.context_length + shape.new_tokens),
        kv_cache_bytes_per_token=layout.bytes_per_token(_dtype_bytes(layout, kv_cache_dtype)),
        logits_bytes_prefill=_prefill_logits_bytes(model, shape), layout=layout, budget_bytes=budget_bytes,
        fits=None if budget_bytes is None else peak <= budget_bytes, max_batch_size=max_batch, what_ifs=tuple(changes),
        notes=tuple(notes), torch_version=torch.__version__, transformers_version=transformers.__version__,
    )


def _dtype_bytes(layout: Any, kv_cache_dtype: KvCacheDtype) -> int:
    return KV_DTYPE_BYTES.get(kv_cache_dtype, layout.dtype_bytes)


def _quantized_cache_saving(layout: Any, shape: GenerationShape, phase: str, step: int, kv_cache_dtype: KvCacheDtype) -> int:
    """Bytes a quantized cache saves at the peak: the cache then holds the prompt plus the tokens so far
    (a static cache holds every position from the start)."""
    if shape.cache is CacheKind.STATIC:
        tokens = shape.context_length + shape.new_tokens
    else:
        tokens = shape.context_length + (step if phase == "decode" else 0)
    cached = layout.bytes_per_token() * shape.batch_size * tokens
    return cached - cached * _dtype_bytes(layout, kv_cache_dtype) // layout.dtype_bytes


def _estimate_peak(workload: Workload, shape: GenerationShape, kv_cache_dtype: KvCacheDtype, layout: Any, probe: OpProbe | None) -> int:
    peak, phase, step, _ = _peak(workload, shape, probe)
    if kv_cache_dtype is not KvCacheDtype.MODEL:
        peak -= _quantized_cache_saving(layout, shape, phase, step, kv_cache_dtype)
    return peak


def _what_ifs(workload: Workload, shape: GenerationShape, kv_cache_dtype: KvCacheDtype, layout: Any, probe: OpProbe | None,
              peak: int, phase: str, step: int, budget_bytes: int | None) -> list[GenerationWhatIf]:
    candidates: list[tuple[str, GenerationShape, KvCacheDtype]] = []
    for dtype in (KvCacheDtype.BF16, KvCacheDtype.INT8):
        if dtype is not kv_cache_dtype and KV_DTYPE_BYTES[dtype] < layout.dtype_bytes:
            candidates.append((f"KV cache in {dtype.value}", shape, dtype))
    other_cache = CacheKind.STATIC if shape.cache is CacheKind.DYNAMIC else CacheKind.DYNAMIC
    candidates.append((f"{other_cache.value} cache", dataclasses.replace(shape, cache=other_cache), kv_cache_dtype))
    if shape.context_length > 1:
        candidates.append((f"context {shape.context_length // 2}", dataclasses.replace(shape, context_length=shape.context_length // 2), kv_cache_dtype))
    if shape.batch_size > 1:
        candidates.append((f"batch {shape.batch_size // 2}", dataclasses.replace(shape, batch_size=shape.batch_size // 2), kv_cache_dtype))
    if shape.new_tokens > 3:
        candidates.append((f"{shape.new_tokens // 4} new tokens", dataclasses.replace(shape, new_tokens=shape.new_tokens // 4), kv_cache_dtype))
    results = []
    for change, changed_shape, dtype in candidates:
        if changed_shape is shape:
            changed_peak = peak + _quantized_cache_saving(layout, shape, phase, step, kv_cache_dtype) * (kv_cache_dtype is not KvCacheDtype.MODEL) \
                - _quantized_cache_saving(layout, shape, phase, step, dtype)
        else:
            changed_peak = _estimate_peak(workload, changed_shape, dtype, layout, probe)
        results.append(GenerationWhatIf(change=change, peak_bytes=changed_peak, saving_bytes=peak - changed_peak,
                                        fits=None if budget_bytes is None else changed_peak <= budget_bytes))
    return results


def _max_batch_size(workload: Workload, shape: GenerationShape, kv_cache_dtype: KvCacheDtype, layout: Any, probe: OpProbe | None,
                    budget_bytes: int) -> int:
    """The most sequences that fit: a line through batch 1 and 2 guesses, fake runs confirm."""
    def fits(batch: int) -> bool:
        return _estimate_peak(workload, dataclasses.replace(shape, batch_size=batch), kv_cache_dtype, layout, probe) <= budget_bytes

    one = _estimate_peak(workload, dataclasses.replace(shape, batch_size=1), kv_cache_dtype, layout, probe)
    if one > budget_bytes:
        return 0
    two = _estimate_peak(workload, dataclasses.replace(shape, batch_size=2), kv_cache_dtype, layout, probe)
    per_sequence = max(two - one, 1)
    guess = max(1, 1 + (budget_bytes - one) // per_sequence)
    low, high = (guess, None) if fits(guess) else (1, guess)
    if high is None:  # grow until it no longer fits
        step = 1
        for _ in itertools.count():
            if not fits(low + step):
                high = low + step
                break
            low, step = low + step, step * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def describe_budget(result: GenerationMemory) -> str:
    """One line: fits or not, and the largest batch that does."""
    if result.budget_bytes is None:
        return ""
    verdict = "fits" if result.fits else "does not fit"
    return (f"{verdict} in {format_bytes(result.budget_bytes)}; at most {result.max_batch_size} sequences of "
            f"{result.context_length}+{result.new_tokens} tokens fit")
