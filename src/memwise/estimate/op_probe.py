"""Learning what an opaque kernel allocates inside itself, from a small real run of that one op.

Fake tensors see an op's outputs but not the scratch buffers its CPU kernel allocates and frees
before returning (an im2col buffer, a transposed copy for a matmul, an LSTM's gates). The probe
runs the op once for real on random inputs of the same shapes, dtypes and strides under the
allocator's profiler, and returns the bytes the op held above its own outputs at its internal peak.
Results are cached by op and signature.
"""

import dataclasses
from typing import Any

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from memwise.measure.tracker import allocation_events, profiling_memory

# Ops whose kernels never allocate scratch memory: views, metadata, in-place fills and copies.
_SKIP_TAGS = (torch.Tag.inplace_view, torch.Tag.view_copy) if hasattr(torch.Tag, "view_copy") else (torch.Tag.inplace_view,)
_CPU = torch.device("cpu")
# Arguments that carry a kernel's private state from forward to backward (RNN workspaces, cuDNN
# reserves): a probe would have to invent their bytes, and kernels trust them blindly.
_OPAQUE_ARGUMENTS = ("workspace", "reserve")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What one op allocated for real.

    Attributes:
        scratch_bytes: bytes held above the op's outputs allocated so far at its internal peak.
        output_storage_bytes: storage bytes of each tensor in the flattened output, as the real
            kernel sized it (a oneDNN workspace can be larger than its fake twin), or () if unknown.
        late_outputs: positions in the flattened output whose storage the kernel allocated after
            its internal peak (oneDNN's convolution backward computes the weight gradient in a
            private buffer and copies it into the output at the end).
    """

    scratch_bytes: int
    output_storage_bytes: tuple[int, ...]
    late_outputs: tuple[int, ...] = ()


NO_PROBE = ProbeResult(scratch_bytes=0, output_storage_bytes=())


class OpProbe:
    """Measures and caches the hidden scratch bytes of ops on CPU.

    Args:
        max_probe_bytes: ops whose inputs and outputs together exceed this are not probed (their
            scratch is assumed zero, and counted in `unprobed_bytes`).
    """

    def __init__(self, *, max_probe_bytes: int = 256 * 2**20) -> None:
        self.max_probe_bytes = max_probe_bytes
        self.cache: dict[Any, int] = {}
        self.probed = 0
        self.unprobed_ops: dict[str, int] = {}
        # op -> the most bytes of inputs and outputs one call of it had, for ops whose scratch
        # is not modelled (too large to probe, or reading a kernel's private workspace)
        self.unmodelled_bytes: dict[str, int] = {}

    def measure(self, func: torch._ops.OpOverload, args: tuple, kwargs: dict, output_bytes: int) -> ProbeResult:
        """What `func(*args, **kwargs)` really allocates on CPU (`NO_PROBE` when not probed)."""
        if func is _LSTM_BACKWARD:
            signature = _signature(func, args, kwargs)
            if signature not in self.cache:
                input_bytes = sum(_tensor_bytes(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
                try:
                    if input_bytes + output_bytes > self.max_probe_bytes:
                        raise ValueError("too large to probe")
                    with _disable_current_modes():
                        self.cache[signature] = _probe_lstm_backward(args)
                    self.probed += 1
                except Exception:  # noqa: BLE001  (left unmodelled, and the range says so)
                    self.cache[signature] = None
            if self.cache[signature] is not None:
                return self.cache[signature]
        if _reads_private_workspace(func):
            self._unmodelled(func, args, kwargs, output_bytes)
            return NO_PROBE
        if _is_trivial(func):
            return NO_PROBE
        signature = _signature(func, args, kwargs)
        if signature in self.cache:
            return self.cache[signature]
        input_bytes = sum(_tensor_bytes(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
        if input_bytes + output_bytes > self.max_probe_bytes:
            scaled = self._probe_scaled(func, args, kwargs, input_bytes + output_bytes)
            if scaled is not None:
                self.cache[signature] = scaled
                return scaled
            self._unmodelled(func, args, kwargs, output_bytes)
            self.unprobed_ops[str(func)] = self.unprobed_ops.get(str(func), 0) + 1
            self.cache[signature] = NO_PROBE
            return NO_PROBE
        try:
            result = _probe(func, args, kwargs)
        except Exception:  # an op that cannot run on random inputs: assume no scratch
            result = NO_PROBE
        self.cache[signature] = result
        self.probed += 1
        return result


    def _probe_scaled(self, func: Any, args: tuple, kwargs: dict, operand_bytes: int) -> ProbeResult | None:
        """Scratch of a large convolution, batch-norm or pooling op, probed at batch k and 2k (as
        large as the limit allows) and extended to the real batch as a + b * batch (im2col and
        per-sample buffers grow with the batch, per-thread ones do not); None when the op is not
        one of those."""
        carriers = _BATCH_CARRIERS.get(str(func))
        if carriers is None:
            return None
        batch = args[carriers[0]].shape[0] if isinstance(args[carriers[0]], torch.Tensor) and args[carriers[0]].dim() else 0
        # the largest k with a probe at 2k samples under the limit: kernels pick their algorithm by
        # shape, so the probes stay as close to the real batch as the limit allows
        k = min(batch // 2, int(self.max_probe_bytes * batch / (2 * operand_bytes)))
        if batch < 3 or k < 1:
            return None
        scratch, sizes, late = [], [], []
        for small in (k, 2 * k):
            shrunk = list(args)
            for position in carriers:
                if isinstance(shrunk[position], torch.Tensor) and shrunk[position].dim() and shrunk[position].shape[0] == batch:
                    shrunk[position] = shrunk[position][:small]
            try:
                result = _probe(func, tuple(shrunk), kwargs)
            except Exception:  # noqa: BLE001  (left unmodelled, and the range says so)
                return None
            scratch.append(result.scratch_bytes)
            sizes.append(result.output_storage_bytes)
            late.append(result.late_outputs)
        self.probed += 2
        per_k = max(scratch[1] - scratch[0], 0)
        # the real kernel's output sizes (a oneDNN workspace can differ from its fake twin), extended alike
        outputs = tuple(one + (two - one) * (batch - k) // k for one, two in zip(*sizes)) if len(sizes[0]) == len(sizes[1]) else ()
        return ProbeResult(
            scratch_bytes=max(scratch[0] + per_k * (batch - k) // k, 0), output_storage_bytes=outputs,
            late_outputs=late[0] if late[0] == late[1] else (),
        )

    def _unmodelled(self, func: Any, args: tuple, kwargs: dict, output_bytes: int) -> None:
        operand_bytes = output_bytes + sum(_tensor_bytes(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
        self.unmodelled_bytes[str(func)] = max(self.unmodelled_bytes.get(str(func), 0), operand_bytes)


_LSTM_BACKWARD = torch.ops.aten.mkldnn_rnn_layer_backward.default
# Ops whose scratch is probed at a smaller batch when too large to probe whole: op -> positions of
# the arguments that carry the batch in dim 0 (the first one's batch is the op's).
_BATCH_CARRIERS = {
    "aten.convolution.default": (0,),
    "aten.convolution_backward.default": (0, 1),
    "aten.native_batch_norm.default": (0,),
    "aten._native_batch_norm_legit.default": (0,),
    "aten._native_batch_norm_legit_no_training.default": (0,),
    "aten.native_batch_norm_backward.default": (0, 1),
    "aten.max_pool2d_with_indices.default": (0,),
    "aten.max_pool2d_with_indices_backward.default": (0, 1, 7),
    "aten.avg_pool2d.default": (0,),
    "aten.avg_pool2d_backward.default": (0, 1),
    "aten._adaptive_avg_pool2d.default": (0,),
    "aten._adaptive_avg_pool2d_backward.default": (0, 1),
}


def _probe_lstm_backward(args: tuple) -> ProbeResult:
    """The oneDNN LSTM backward's scratch, probed as a pair: a real forward of the same shapes makes
    the workspace the backward reads (its bytes cannot be invented), then the backward runs under
    the allocator's profiler."""
    real = [_real_like(value).detach() if isinstance(value, torch.Tensor) else value for value in args]
    (input_, w1, w2, w3, w4, hx, cx, _output, _hy, _cy, grad_output, grad_hy, grad_cy,
     reverse, mode, hidden_size, num_layers, has_biases, train, bidirectional, batch_sizes, batch_first, _workspace) = real
    with torch.enable_grad():  # oneDNN keeps the workspace only when autograd may need it
        output, hy, cy, workspace = torch.ops.aten.mkldnn_rnn_layer.default(
            input_, w1, w2, w3, w4, hx, cx, reverse, batch_sizes, mode, hidden_size, num_layers, has_biases, bidirectional,
            batch_first, train)
    backward_args = (input_, w1, w2, w3, w4, hx, cx, output, hy, cy, grad_output, grad_hy, grad_cy, reverse, mode,
                     hidden_size, num_layers, has_biases, train, bidirectional, batch_sizes, batch_first, workspace)
    return _measure_real(_LSTM_BACKWARD, backward_args, {})


def _reads_private_workspace(func: torch._ops.OpOverload) -> bool:
    if getattr(func, "namespace", None) != "aten":
        return False
    return any(any(word in arg.name for word in _OPAQUE_ARGUMENTS) for arg in func._schema.arguments)


def _is_trivial(func: torch._ops.OpOverload) -> bool:
    if getattr(func, "namespace", None) != "aten":
        return True
    if any(tag in func.tags for tag in _SKIP_TAGS) or torch.Tag.pointwise in func.tags:
        return True
    schema = func._schema
    if any(any(word in arg.name for word in _OPAQUE_ARGUMENTS) for arg in schema.arguments):
        return True  # random bytes in a kernel's own workspace can crash it: never probe those
    if any(ret.alias_info is not None for ret in schema.returns):  # views and in-place ops
        return True
    return func.name().startswith(("aten::empty", "aten::zeros", "aten::ones", "aten::full", "aten::rand", "aten::detach", "aten::_to_copy", "aten::copy", "aten::clone", "aten::lift_fresh", "aten::scalar_tensor", "aten::_local_scalar_dense", "aten::_unsafe_view"))


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes() if tensor.numel() else 0


def _signature(func: Any, args: tuple, kwargs: dict) -> Any:
    def describe(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("T", tuple(value.shape), tuple(value.stride()), value.dtype, value.requires_grad)
        if isinstance(value, (list, tuple)):
            return tuple(describe(v) for v in value)
        if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return value
        return type(value).__name__

    return (str(func), describe(args), tuple(sorted((k, describe(v)) for k, v in kwargs.items())))


def _real_like(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    size = sum((s - 1) * st for s, st in zip(value.shape, value.stride())) + 1 if value.numel() else 0
    storage = torch.empty(size, dtype=value.dtype, device=_CPU)
    if value.dtype.is_floating_point or value.dtype.is_complex:
        storage.normal_()
    elif value.dtype == torch.bool:
        storage.fill_(True)
    else:
        storage.zero_()
    real = storage.as_strided(value.shape, value.stride())
    return real.requires_grad_(value.requires_grad) if value.dtype.is_floating_point else real


def _probe(func: Any, args: tuple, kwargs: dict) -> ProbeResult:
    with _disable_current_modes():
        return _probe_real(func, args, kwargs)


def _probe_real(func: Any, args: tuple, kwargs: dict) -> ProbeResult:
    real_args, real_kwargs = tree_map(_real_like, (args, kwargs))
    return _measure_real(func, real_args, real_kwargs)


def _measure_real(func: Any, real_args: tuple, real_kwargs: dict) -> ProbeResult:
    with profiling_memory(_CPU) as prof:  # grad mode as the caller had it: some kernels check it
        output = func(*real_args, **real_kwargs)
    running = peak = 0
    allocated_at: dict[int, int] = {}  # address -> index of its latest allocation
    peak_index = -1
    for index, (_, _, event) in enumerate(allocation_events(prof, _CPU, with_marks=False)):
        fields = event.extra_fields
        running += fields.alloc_size
        if fields.alloc_size > 0:
            allocated_at[fields.ptr] = index
        if running > peak:
            peak, peak_index = running, index
    leaves = tree_flatten(output)[0]
    sizes = tuple(value.untyped_storage().nbytes() if isinstance(value, torch.Tensor) else 0 for value in leaves)
    late, early_bytes, seen = [], 0, set()
    for position, value in enumerate(leaves):
        if not isinstance(value, torch.Tensor) or value.untyped_storage().data_ptr() in seen:
            continue
        address = value.untyped_storage().data_ptr()
        seen.add(address)
        if allocated_at.get(address, -1) > peak_index:
            late.append(position)
        elif address in allocated_at:
            early_bytes += sizes[position]
    del output, leaves
    scratch = peak - early_bytes if late else peak - running
    return ProbeResult(scratch_bytes=max(0, scratch), output_storage_bytes=sizes, late_outputs=tuple(late))
