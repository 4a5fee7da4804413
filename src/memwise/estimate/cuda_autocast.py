"""CUDA autocast's casting rules applied to CPU tensors, so a step run on (fake) CPU tensors casts
as it would under `torch.autocast("cuda")` on a GPU.

Activation memory depends on the dtypes autocast picks, and the CPU and CUDA op lists differ: on
CUDA `layer_norm`, `exp`, `pow`, the losses and the upsampling ops run in fp32, and `softmax`,
`log_softmax`, `sum`, `cumsum`, `prod` and the vector/matrix norms return fp32 for a low-precision
input. On CPU those stay in the low-precision dtype, while ops such as `avg_pool3d`,
`reflection_pad2d`, `stft` or `cat` have CPU-only rules. `torch.autocast("cpu")` therefore gets the
dtypes, and so the memory, of a GPU run wrong.

How it works: autocast is a dispatch key that sits above autograd, so its casts are recorded by
autograd (a weight cast to bf16 is what a matmul saves for backward). CPU tensors carry the
`AutocastCPU` key. While `cuda_autocast_rules()` is open, this module registers a Python kernel at
`AutocastCPU` for every aten op of CUDA's lists (shadowing the CPU kernel where there is one) and a
fallthrough for every aten op that only CPU autocast handles; `cuda_autocast(dtype)` then turns
the key on with `torch.autocast("cpu", dtype=dtype)`. CPU autocast's own rules never apply while
the rules are registered. Because the kernels sit on the dispatcher, they see the same aten ops as
CUDA autocast does, including those that composite functions (`F.multi_head_attention_forward`,
`cross_entropy`, `F.interpolate`, `torch.einsum`) call internally.

Source of the rules (PyTorch 2.13):
    The op lists are `AT_FORALL_LOWER_PRECISION_FP`, `AT_FORALL_FP32`,
    `AT_FORALL_FP32_SET_OPT_DTYPE`, `AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE` and
    `AT_FORALL_PROMOTE` in aten/src/ATen/autocast_mode.h as shipped with the torch 2.13.0 wheel
    (torch/include/ATen/autocast_mode.h), and the policies are its `WrapFunction_`
    specialisations and `promote_type`/`prioritize`/`set_opt_dtype`/`type_from_firstarg`. The
    CUDA registrations (`TORCH_LIBRARY_IMPL(aten, Autocast, m)`: the lists above plus
    `cudnn_convolution`, `cudnn_convolution_transpose` and the banned `binary_cross_entropy`) and
    `cached_cast` are in aten/src/ATen/autocast_mode.cpp (pytorch/pytorch commit
    008ec6b1840c94ff6d0f685bc10fbf585167c673). cuDNN RNNs are cast by `_cudnn_rnn_cast_reflatten`
    in aten/src/ATen/cudnn/AutocastRNN.cpp (commit 0d0444e43c8845ef5eb43d98bc561ceb2842b99b).
    `tests/estimate/test_cuda_autocast.py` checks the tables against the ops that have an
    `AutocastCUDA` kernel in the running torch.

Policies, as in autocast_mode.h (`eligible` = a floating-point tensor that is not float64):
    lower_precision_fp: eligible tensor arguments are cast to the autocast dtype.
    fp32: eligible tensor arguments are cast to float32.
    fp32_set_opt_dtype: when the first argument is eligible and no `dtype` was given,
        `dtype=torch.float32` is passed; inputs are not cast (the op converts internally).
    fp32_append_dtype: `norm.Scalar`/`norm.ScalarOpt_dim` are redispatched to their `dtype`
        overload with float32 (the input's own dtype when it is not eligible).
    promote: every eligible argument is cast to the widest floating dtype among the `Tensor` and
        `Tensor[]` arguments (float32 over the autocast dtype; float64 ignored).
    banned: `binary_cross_entropy` raises, as on CUDA.
    Casts to the autocast dtype of float32 leaf tensors that require grad (parameters) are cached
    for the duration of the outermost `cuda_autocast` context, so a weight used twice is cast
    once and the cast copy lives until the context exits (like `cached_cast`, this happens in
    no-grad mode too, because it depends on `requires_grad`, not on grad mode).

Nested autocast regions inside the model:
    `torch.autocast("cpu", ...)`: the fake run's tensors are on the CPU, so device-agnostic code
        (`torch.autocast(x.device.type, enabled=False)`, as in Hugging Face rotary embeddings)
        names "cpu" where it would name "cuda" on the GPU. Such a region is honoured as the GPU
        would honour the "cuda" one: `enabled=False` turns the rules off, and `dtype=` changes
        the autocast dtype.
    `torch.autocast("cuda", enabled=False)` and `torch.cuda.amp.autocast(enabled=False)`: honoured
        (the kernels pass through while CUDA autocast is disabled inside `cuda_autocast`).
    Inside the context `torch.is_autocast_enabled("cuda")` is True and
    `torch.get_autocast_dtype("cuda")` is the dtype, so model code that asks sees what it would
    see on the GPU.
"""

import contextlib
import dataclasses
import enum
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch.library import Library, fallthrough_kernel


class CastPolicy(str, enum.Enum):
    """How CUDA autocast treats an op (the `CastPolicy` enum of ATen/autocast_mode.h)."""

    LOWER_PRECISION_FP = "lower_precision_fp"
    FP32 = "fp32"
    FP32_SET_OPT_DTYPE = "fp32_set_opt_dtype"
    FP32_APPEND_DTYPE = "fp32_append_dtype"
    PROMOTE = "promote"
    BANNED = "banned"
    # Not a policy of autocast_mode.h: the cuDNN RNN wrapper of cudnn/AutocastRNN.cpp, applied to
    # the aten RNN ops that call `_cudnn_rnn` on a GPU (a CPU build has no `_cudnn_rnn`).
    CUDNN_RNN = "cudnn_rnn"


# Op names are "name" for the default overload and "name.overload" otherwise, as in the
# `_(name, overload)` entries of the AT_FORALL_* macros.
_LOWER_PRECISION_FP_OPS = (
    # AT_FORALL_LOWER_PRECISION_FP
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu",
    "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm",
    "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot", "_thnn_fused_lstm_cell",
    "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
    # registered for CUDA only, in autocast_mode.cpp
    "cudnn_convolution", "cudnn_convolution_transpose",
)
_FP32_OPS = (
    # AT_FORALL_FP32
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar",
    "softplus", "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim",
    "nuclear_norm", "nuclear_norm.dim", "cosine_similarity", "poisson_nll_loss",
    "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d",
    "_upsample_nearest_exact2d", "upsample_nearest3d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "_upsample_bilinear2d_aa", "upsample_trilinear3d",
    "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)
_FP32_SET_OPT_DTYPE_OPS = (
    # AT_FORALL_FP32_SET_OPT_DTYPE
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum",
    "linalg_vector_norm", "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum",
    "sum.dim_IntList",
)
# AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE: op without a dtype -> overload it redispatches to.
_FP32_APPEND_DTYPE_TARGETS = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
_PROMOTE_OPS = (
    # AT_FORALL_PROMOTE
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
    "tensordot", "scatter_add",
)
_BANNED_MESSAGES = {
    "binary_cross_entropy": (
        "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
        "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
        "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
        "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
        "safe to autocast."
    ),
}
_CUDNN_RNN_OPS = (
    "lstm.input", "lstm.data", "gru.input", "gru.data", "rnn_tanh.input", "rnn_tanh.data",
    "rnn_relu.input", "rnn_relu.data",
)


def _policy_table() -> dict[str, CastPolicy]:
    table: dict[str, CastPolicy] = {}
    groups = (
        (_LOWER_PRECISION_FP_OPS, CastPolicy.LOWER_PRECISION_FP),
        (_FP32_OPS, CastPolicy.FP32),
        (_FP32_SET_OPT_DTYPE_OPS, CastPolicy.FP32_SET_OPT_DTYPE),
        (tuple(_FP32_APPEND_DTYPE_TARGETS), CastPolicy.FP32_APPEND_DTYPE),
        (_PROMOTE_OPS, CastPolicy.PROMOTE),
        (tuple(_BANNED_MESSAGES), CastPolicy.BANNED),
        (_CUDNN_RNN_OPS, CastPolicy.CUDNN_RNN),
    )
    for names, policy in groups:
        for name in names:
            table[name] = policy
    return table


CUDA_AUTOCAST_POLICIES: Mapping[str, CastPolicy] = MappingProxyType(_policy_table())
"""aten op name ("name" or "name.overload") -> how CUDA autocast treats it (PyTorch 2.13)."""

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
_AUTOCAST_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype, *, cache_enabled: bool = True) -> Iterator[None]:
    """Autocast for CPU tensors that follows CUDA autocast's op lists instead of CPU's.

    Enter it instead of `torch.autocast("cpu", dtype=dtype)` around forward and loss. Ops called
    inside cast their inputs (and pick output dtypes) as `torch.autocast("cuda", dtype=dtype)`
    would on a GPU; the casts are recorded by autograd, so backward sees the same dtypes.

    Args:
        dtype: the autocast dtype, `torch.bfloat16` or `torch.float16`.
        cache_enabled: keep the casts of parameters for the duration of the context (autocast's
            weight cache, as `torch.autocast(cache_enabled=...)`).

    Assumptions:
        The tensors stand for CUDA tensors; every floating-point tensor other than float64 is
        eligible for casting, whatever its device says.

    Known limitations:
        - While any `cuda_autocast` or `cuda_autocast_rules` context is open, CPU autocast in
          every thread of the process follows CUDA's rules (the kernels are process-wide).
        - Only aten ops are covered; other namespaces keep their CPU autocast kernels.
        - `torch.autocast("cuda", enabled=True)` inside the model is turned off by torch itself on
          a machine without CUDA, so such a region runs without autocast here.
        - A checkpointed block's recompute in backward enters `torch.autocast("cpu")` again; it
          follows CUDA's rules only while `cuda_autocast_rules()` is still open then, it does
          not cache weight casts (the GPU caches them within the recompute), and a
          `torch.autocast("cuda", enabled=False)` region inside the block is not honoured there.
        - On real CPU tensors an op that CUDA runs in low precision may have no CPU kernel for
          that dtype (`avg_pool3d` in bf16 raises NotImplementedError); fake tensors use meta
          kernels and are not affected.
        - As in torch, the weight cache is keyed by the parameter alone: a nested region with a
          different dtype gets the outer region's cast and the op fails on mixed dtypes.
        - cuDNN RNNs cast their weights into one flat low-precision buffer; here each weight is
          cast on its own (same bytes) and the CPU RNN kernels run in the low-precision dtype.
        - fp16 `log_softmax`/`softmax` with `dtype=float32` use a fused kernel on CUDA; on CPU
          the input is first converted to fp32 (a transient copy a CUDA run does not make).

    Raises:
        ValueError: `dtype` is not bfloat16 or float16.
        RuntimeError: a banned op (`binary_cross_entropy`) or a promote op with both bfloat16 and
            float16 inputs runs inside the context, as on CUDA.
    """
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16 for cuda_autocast, got {dtype!r}")
    state = _THREAD_STATE
    cpu_autocast = torch.autocast("cpu", dtype=dtype, cache_enabled=cache_enabled)
    with cuda_autocast_rules(), cpu_autocast, _cuda_autocast_flags(dtype):
        outermost = state.depth == 0
        if outermost:
            state.cast_cache = {}
        state.depth += 1
        try:
            yield
        finally:
            state.depth -= 1
            if outermost:
                state.cast_cache = None


def open_weight_cast_cache() -> None:
    """Starts caching parameter casts in this thread, as CUDA autocast's `cached_cast` does while an
    autocast region is open; for callers that enter `torch.autocast("cpu")` themselves under
    `cuda_autocast_rules()` (the estimator's step runner). No-op inside `cuda_autocast`."""
    state = _THREAD_STATE
    if state.depth == 0:
        state.cast_cache = {}


def close_weight_cast_cache() -> None:
    """Drops the cached casts (the outermost autocast region has exited)."""
    state = _THREAD_STATE
    if state.depth == 0:
        state.cast_cache = None


@contextlib.contextmanager
def cuda_autocast_rules() -> Iterator[None]:
    """While open, `torch.autocast("cpu")` regions follow CUDA autocast's op lists.

    `cuda_autocast` opens it; keep it open around backward too when the model recomputes
    checkpointed blocks there, since the recompute re-enters `torch.autocast("cpu")`. It does not
    turn autocast on by itself. Nested and concurrent uses are counted; the CPU rules come back
    when the last one exits.
    """
    _REGISTRATION.acquire()
    try:
        yield
    finally:
        _REGISTRATION.release()


@contextlib.contextmanager
def _cuda_autocast_flags(dtype: torch.dtype) -> Iterator[None]:
    # Only thread-local flags: CPU tensors do not carry the AutocastCUDA key, so no CUDA kernel runs.
    was_enabled, previous_dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", was_enabled)
        torch.set_autocast_dtype("cuda", previous_dtype)


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.depth = 0  # open cuda_autocast contexts in this thread
        # id(source) -> (weak reference to source, cast copy), like cached_casts in autocast_mode.cpp
        self.cast_cache: dict[int, tuple[weakref.ref, torch.Tensor]] | None = None


_THREAD_STATE = _ThreadState()


class _Registration:
    """Process-wide registration of the kernels, counted so that nested contexts share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._library: Library | None = None

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                self._library = _register_kernels()
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._library is not None:
                self._library._destroy()  # the CPU kernels that were shadowed become active again
                self._library = None


_REGISTRATION = _Registration()


def _register_kernels() -> Library:
    cpu_only = [name for name in _aten_ops_with_kernel("AutocastCPU") if name not in CUDA_AUTOCAST_POLICIES]
    library = Library("aten", "IMPL")
    with warnings.catch_warnings():
        # torch warns once per process when a kernel shadows an existing one; that is the point here
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        for name, policy in CUDA_AUTOCAST_POLICIES.items():
            op = _lookup_op(name)
            if op is not None:  # an older torch may lack an op of the 2.13 lists
                library.impl(name, _make_kernel(name, op, policy), "AutocastCPU")
        for name in cpu_only:
            library.impl(name, fallthrough_kernel, "AutocastCPU")
    return library


def _aten_ops_with_kernel(dispatch_key: str) -> list[str]:
    """Names ("name" or "name.overload") of the aten ops with a kernel of their own at `dispatch_key`."""
    names = []
    for qualified in torch._C._dispatch_get_all_op_names():
        if qualified.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key):
            names.append(qualified.removeprefix("aten::"))
    return names


def _lookup_op(name: str) -> torch._ops.OpOverload | None:
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None)
    return None if packet is None else getattr(packet, overload or "default", None)


@dataclasses.dataclass(frozen=True)
class _Signature:
    """Where an op's tensor arguments are, from its schema."""

    positional: tuple[torch._C.Argument, ...]
    # (position or keyword name, kind) of every Tensor, Tensor? and Tensor[] argument
    tensor_arguments: tuple[tuple[int | str, str], ...]
    dtype_argument: int | str | None  # where an optional `dtype` argument is

    @classmethod
    def of(cls, op: torch._ops.OpOverload) -> "_Signature":
        positional = tuple(argument for argument in op._schema.arguments if not argument.kwarg_only)
        tensor_arguments = []
        dtype_argument: int | str | None = None
        for position, argument in enumerate(op._schema.arguments):
            where: int | str = argument.name if argument.kwarg_only else position
            kind = _tensor_kind(argument.type)
            if kind is not None:
                tensor_arguments.append((where, kind))
            if argument.name == "dtype":
                dtype_argument = where
        return cls(positional, tuple(tensor_arguments), dtype_argument)

    def bind(self, args: tuple, kwargs: dict) -> tuple[list, dict]:
        """All positional arguments (defaults filled in, as the dispatcher drops trailing ones) and the keywords."""
        values = list(args)
        keywords = dict(kwargs)
        for argument in self.positional[len(values):]:
            values.append(keywords.pop(argument.name) if argument.name in keywords else argument.default_value)
        return values, keywords


def _tensor_kind(jit_type: Any) -> str | None:
    if isinstance(jit_type, torch._C.TensorType):
        return "tensor"
    if isinstance(jit_type, torch._C.OptionalType) and isinstance(jit_type.getElementType(), torch._C.TensorType):
        return "optional"  # cast like a tensor, but promote_type ignores it (no prioritize overload)
    if isinstance(jit_type, torch._C.ListType) and isinstance(jit_type.getElementType(), torch._C.TensorType):
        return "list"  # Tensor[] only: autocast leaves Tensor?[] (index_put's indices) alone
    return None


def _make_kernel(name: str, op: torch._ops.OpOverload, policy: CastPolicy) -> Callable[..., Any]:
    signature = _Signature.of(op)
    if policy is CastPolicy.BANNED:
        message = _BANNED_MESSAGES[name]

        def banned(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(message)

        return banned
    append_target = _lookup_op(_FP32_APPEND_DTYPE_TARGETS[name]) if policy is CastPolicy.FP32_APPEND_DTYPE else None

    def kernel(*args: Any, **kwargs: Any) -> Any:
        # As the C++ wrappers: the op and the casts run with autocast excluded, so ops it calls
        # internally are not cast again.
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU_KEYS):
            state = _THREAD_STATE
            if state.depth > 0 and not torch.is_autocast_enabled("cuda"):
                return op(*args, **kwargs)  # inside torch.autocast("cuda", enabled=False)
            values, keywords = signature.bind(args, kwargs)
            lower = torch.get_autocast_dtype("cpu")
            if policy is CastPolicy.FP32_SET_OPT_DTYPE:
                if _is_eligible(values[0]) and _get(values, keywords, signature.dtype_argument) is None:
                    _set(values, keywords, signature.dtype_argument, torch.float32)
                return op(*values, **keywords)
            if policy is CastPolicy.FP32_APPEND_DTYPE:
                first = values[0]
                out_dtype = torch.float32 if _is_eligible(first) else first.dtype
                return append_target(*values, **keywords, dtype=out_dtype)
            cache = state.cast_cache
            if policy is CastPolicy.LOWER_PRECISION_FP:
                to_dtype = lower
            elif policy is CastPolicy.FP32:
                to_dtype = torch.float32
            elif policy is CastPolicy.PROMOTE:
                to_dtype = _promote_type(lower, values, keywords, signature)
            else:  # CUDNN_RNN: weights go into a fresh flat buffer on the GPU, never the cache
                to_dtype, cache = lower, None
            for where, kind in signature.tensor_arguments:
                value = _get(values, keywords, where)
                if kind == "list":
                    _set(values, keywords, where, [_cached_cast(to_dtype, item, lower, cache) for item in value])
                elif value is not None:
                    _set(values, keywords, where, _cached_cast(to_dtype, value, lower, cache))
            return op(*values, **keywords)

    return kernel


def _get(values: list, keywords: dict, where: int | str | None) -> Any:
    if isinstance(where, int):
        return values[where]
    return keywords.get(where)


def _set(values: list, keywords: dict, where: int | str | None, value: Any) -> None:
    if isinstance(where, int):
        values[where] = value
    else:
        keywords[where] = value


def _is_eligible(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


def _promote_type(lower: torch.dtype, values: list, keywords: dict, signature: _Signature) -> torch.dtype:
    """The widest floating dtype among the Tensor and Tensor[] arguments (`promote_type` in autocast_mode.h)."""
    current = lower
    for where, kind in signature.tensor_arguments:
        value = _get(values, keywords, where)
        if kind == "optional":
            continue
        for tensor in value if kind == "list" else (value,):
            if not _is_eligible(tensor):
                continue
            if current == torch.float32 or tensor.dtype == torch.float32:
                current = torch.float32
            elif not (current == lower and tensor.dtype == lower):
                raise RuntimeError("Unexpected floating ScalarType in at::autocast::prioritize")
    return current


def _cached_cast(to_dtype: torch.dtype, value: Any, lower: torch.dtype, cache: dict | None) -> Any:
    """`value` cast to `to_dtype` when eligible, reusing the cast of a parameter (`cached_cast`)."""
    if not _is_eligible(value) or value.dtype == to_dtype:
        return value
    can_try_cache = (
        cache is not None
        and to_dtype == lower
        and value.dtype == torch.float32
        and value.requires_grad
        and value.is_leaf
        and not value._is_view()
        and torch.is_autocast_cache_enabled()
    )
    if not can_try_cache:
        return value.to(to_dtype)
    cached = cache.get(id(value))
    if cached is not None and cached[0]() is value:
        return cached[1]
    cast = value.to(to_dtype)
    cache[id(value)] = (weakref.ref(value), cast)
    return cast
