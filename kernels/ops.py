"""Public attention ops: validation, layout handling and backend dispatch.

Backends: ``"triton"`` (our kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``; never falls back),
``"torch"`` (fp32 torch: on the CPU without grad ``torch_sparse.py``, which computes only a plan's blocks
with PyTorch's CPU flash kernel; elsewhere the references in ``reference.py``), ``"auto"`` (Triton where
it can run, else ``"torch"``, with the reason logged once). ``dense_attention`` also has ``"cudnn"``
(PyTorch's cuDNN attention through ``torch.ops.aten``) and ``"xformers"`` (``xformers.ops.fmha``, imported
lazily by ``xformers_attention.py`` only), both with the log-sum-exp; its ``"auto"`` picks from a table of
measured results.

The Triton kernels have no backward: for inputs that require grad (grad mode on), ``"triton"`` refuses the
call, naming the ways out, and ``"auto"`` takes the reference, whose gradients are exact.

The Triton kernels are registered as ``torch.library`` custom ops (``dit_accel::sparse_attention``,
``dit_accel::refresh_attention``, ``dit_accel::mask_statistics``, ``dit_accel::block_mass`` and
``dit_accel::rotary_qk``) so ``torch.compile(fullgraph=True)`` traces through callers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import os
import weakref

import torch

from . import reference, torch_sparse
from .correction import RESIDUAL_DTYPES, SoftmaxCorrection
from .plan import BlockPlan, _check_block_size, num_blocks

logger = logging.getLogger("dit_accel")

_HALF = (torch.float16, torch.bfloat16)
_BACKENDS = ("auto", "triton", "torch")
MAX_HEAD_DIM = 256

try:  # Triton is a Linux-only dependency; the reference path works without it.
    import triton  # noqa: F401

    _TRITON_IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    _TRITON_IMPORT_ERROR = exc


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _warn_once(msg: str) -> None:
    logger.warning(msg)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _to_bhsd(x: torch.Tensor, layout: str, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D ({layout}), got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        # The kernels read rows of head_dim contiguous values; a strided last dim is copied once.
        x = x.contiguous()
    return x.transpose(1, 2) if layout == "bshd" else x


def _check_inputs(q, k, v, layout: str, kv_len, scale):
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    qh, kh = _to_bhsd(q, layout, "q"), _to_bhsd(k, layout, "k")
    vh = _to_bhsd(v, layout, "v") if v is not None else None
    for name, t in (("k", kh), ("v", vh)):
        if t is None:
            continue
        if t.dtype != qh.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, q has {qh.dtype}")
        if t.device != qh.device:
            raise ValueError(f"{name} is on {t.device}, q is on {qh.device}")
        if t.shape[0] != qh.shape[0] or t.shape[1] != qh.shape[1]:
            raise ValueError(
                f"{name} has batch/heads {tuple(t.shape[:2])}, q has {tuple(qh.shape[:2])} (layout {layout})"
            )
        if t.shape[3] != qh.shape[3]:
            raise ValueError(f"{name} has head_dim {t.shape[3]}, q has {qh.shape[3]}")
    if vh is not None and vh.shape[2] != kh.shape[2]:
        raise ValueError(f"v has {vh.shape[2]} tokens, k has {kh.shape[2]}")
    if qh.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {qh.shape[3]} exceeds the supported maximum {MAX_HEAD_DIM}")
    if qh.dtype not in (*_HALF, torch.float32):
        raise ValueError(
            f"q has dtype {qh.dtype}; supported: float16, bfloat16 (float32 on the torch backend)"
        )
    if kv_len is not None:
        kv_len = _check_kv_len(kv_len, qh.shape[0], kh.shape[2], qh.device)
    if scale is None:
        scale = 1.0 / math.sqrt(qh.shape[3])
    return qh, kh, vh, kv_len, float(scale)


def _check_kv_len(kv_len, batch: int, k_len: int, device) -> torch.Tensor:
    """kv_len as int32 [B]. Values past k_len mean every key (they are clamped to k_len); negative values
    are refused (checked on the host: one synchronisation for a GPU tensor, skipped under torch.compile)."""
    expected = f"an int, a list of B={batch} ints or an integer tensor of shape [B]=[{batch}]"
    if isinstance(kv_len, bool) or (isinstance(kv_len, torch.Tensor) and kv_len.dtype == torch.bool):
        raise ValueError(f"kv_len must be {expected}; a bool (mask) is not a length, got {kv_len!r}")
    if isinstance(kv_len, numbers.Integral):
        if kv_len < 0:
            raise ValueError(f"kv_len must be >= 0 (valid keys per batch element), got {kv_len}")
        return torch.full((batch,), min(int(kv_len), k_len), dtype=torch.int32, device=device)
    if isinstance(kv_len, (list, tuple)):
        if len(kv_len) != batch or any(
            isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in kv_len
        ):
            raise ValueError(f"kv_len must be {expected}, got {kv_len!r}")
        if any(x < 0 for x in kv_len):
            raise ValueError(f"kv_len must be >= 0 (valid keys per batch element), got {list(kv_len)}")
        return torch.tensor([min(int(x), k_len) for x in kv_len], dtype=torch.int32, device=device)
    if not isinstance(kv_len, torch.Tensor):
        raise ValueError(f"kv_len must be {expected}, got {type(kv_len).__name__}")
    if kv_len.dtype.is_floating_point or kv_len.dtype.is_complex:
        raise ValueError(f"kv_len must be an integer tensor, got {kv_len.dtype}")
    if tuple(kv_len.shape) != (batch,):
        raise ValueError(f"kv_len must be {expected}, got shape {tuple(kv_len.shape)}")
    if kv_len.device != device:
        raise ValueError(f"kv_len is on {kv_len.device}, q is on {device}")
    if not torch.compiler.is_compiling() and bool((kv_len < 0).any()):
        b = int(torch.nonzero(kv_len < 0)[0])
        raise ValueError(
            f"kv_len must be >= 0 (valid keys per batch element), got kv_len[{b}] = {int(kv_len[b])}"
        )
    if kv_len.dtype != torch.int32:
        # int64 values past 2^31 would wrap; anything past k_len means every key anyway.
        kv_len = kv_len.clamp(max=k_len).to(torch.int32)
    return kv_len


def _check_plan(plan: BlockPlan, qh: torch.Tensor, kh: torch.Tensor) -> None:
    if not isinstance(plan, BlockPlan):
        raise ValueError(f"plan must be a BlockPlan, got {type(plan).__name__}")
    batch, heads, q_len = qh.shape[:3]
    k_len = kh.shape[2]
    if plan.batch not in (1, batch) or plan.heads not in (1, heads):
        raise ValueError(f"plan has B={plan.batch}, H={plan.heads}; attention has B={batch}, H={heads}")
    if plan.num_q_blocks != num_blocks(q_len, plan.block_q):
        raise ValueError(
            f"plan has {plan.num_q_blocks} query blocks; {q_len} tokens at block_q={plan.block_q} "
            f"need {num_blocks(q_len, plan.block_q)}"
        )
    if plan.num_kv_blocks != num_blocks(k_len, plan.block_k):
        raise ValueError(
            f"plan was built for {plan.num_kv_blocks} key blocks; {k_len} tokens at block_k={plan.block_k} "
            f"need {num_blocks(k_len, plan.block_k)}"
        )
    if plan.device != qh.device:
        raise ValueError(f"plan is on {plan.device}, q is on {qh.device}")


def triton_runtime_unavailable_reason() -> str | None:
    """Why this process cannot run the Triton kernels on any device (None: it can, on CUDA or under
    ``TRITON_INTERPRET=1``). Used to refuse ``backend="triton"`` before any model runs."""
    if _TRITON_IMPORT_ERROR is not None:
        return f"triton could not be imported ({_TRITON_IMPORT_ERROR})"
    if not (torch.cuda.is_available() or _interpret()):
        return "no CUDA device is available (the Triton kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
    return None


_NO_BACKWARD = (
    "inputs require grad and the Triton kernels have no backward. For training through sparse attention "
    "use backend='torch' (exact gradients through the same plan; memory grows with the score matrix), "
    "method='dense' for stock attention, or run inference under torch.no_grad()"
)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _triton_unavailable_reason(qh: torch.Tensor, block_sizes=(), grad: bool = False) -> str | None:
    if _TRITON_IMPORT_ERROR is not None:
        return f"triton could not be imported ({_TRITON_IMPORT_ERROR})"
    if not (qh.is_cuda or _interpret()):
        return f"tensors are on {qh.device}; the Triton kernels need CUDA (or TRITON_INTERPRET=1)"
    if qh.dtype not in _HALF:
        return f"dtype {qh.dtype} is not supported by the Triton kernels (float16, bfloat16)"
    for b in block_sizes:
        if b < 16 or b & (b - 1):
            return f"block size {b} is not a power of two >= 16"
    if grad:
        return _NO_BACKWARD
    return None


def _pick(backend: str, qh: torch.Tensor, op: str, block_sizes=(), grad: bool = False) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = _triton_unavailable_reason(qh, block_sizes, grad)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"{op}: backend='triton' cannot run: {reason}")
        return "triton"
    if reason is not None:
        if qh.is_cuda or grad:
            _warn_once(f"{op}: falling back to the torch reference: {reason}")
        return "torch"
    return "triton"


# --------------------------------------------------------------------------------------------------
# torch.library registration of the Triton launchers
# --------------------------------------------------------------------------------------------------
def _sparse_attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor | None,
    kv_counts: torch.Tensor | None,
    block_q: int,
    block_k: int,
    scale: float,
    kv_len: torch.Tensor | None,
    rho: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    residual_scale: torch.Tensor | None = None,
    rho_offset: float = 0.0,
    clamp_rho: bool = True,
    rho_offset_t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_attention import sparse_attention_fwd

    return sparse_attention_fwd(
        q,
        k,
        v,
        kv_indices,
        kv_counts,
        block_q,
        block_k,
        scale,
        kv_len,
        rho=rho,
        residual=residual,
        residual_scale=residual_scale,
        rho_add=rho_offset_t if rho_offset_t is not None else rho_offset,
        clamp=clamp_rho,
    )


_sparse_attention_op = torch.library.custom_op(
    "dit_accel::sparse_attention", _sparse_attention_impl, mutates_args=()
)


@_sparse_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_q, block_k, scale, kv_len, *args):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _refresh_attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    kv_len: torch.Tensor | None,
    residual_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_refresh import refresh_attention_fwd

    residual, scale_t = _residual_buffers(q, residual_dtype)
    r_scale = scale_t if residual_dtype == torch.float8_e4m3fn else None
    out, lse, rho = refresh_attention_fwd(
        q, k, v, kv_indices, kv_counts, block_q, block_k, scale, kv_len, residual, r_scale
    )
    return out, lse, rho, residual, scale_t


def _residual_buffers(q: torch.Tensor, residual_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual like q (B, H, S_q, D) in ``residual_dtype`` and its fp32 row scales ([B, H, S_q] for float8,
    else an empty tensor: a custom op returns tensors, not None)."""
    fp8 = residual_dtype == torch.float8_e4m3fn
    return (
        q.new_empty(q.shape, dtype=residual_dtype),
        q.new_empty(q.shape[:3] if fp8 else (0,), dtype=torch.float32),
    )


_refresh_attention_op = torch.library.custom_op(
    "dit_accel::refresh_attention", _refresh_attention_impl, mutates_args=()
)


@_refresh_attention_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_q, block_k, scale, kv_len, residual_dtype):
    rows = q.new_empty(q.shape[:3], dtype=torch.float32)
    return (torch.empty_like(q), rows, torch.empty_like(rows), *_residual_buffers(q, residual_dtype))


def _mask_statistics_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    kv_len: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    residual_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_attention import mask_statistics_fwd

    rho = lse.new_empty(lse.shape)
    residual, scale_t = _residual_buffers(q, residual_dtype)
    mask_statistics_fwd(
        q, k, v, kv_indices, kv_counts, block_q, block_k, scale, kv_len, out, lse, rho, residual,
        scale_t if residual_dtype == torch.float8_e4m3fn else None,
    )  # fmt: skip
    return rho, residual, scale_t


_mask_statistics_op = torch.library.custom_op(
    "dit_accel::mask_statistics", _mask_statistics_impl, mutates_args=()
)


@_mask_statistics_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_q, block_k, scale, kv_len, out, lse, residual_dtype):
    return (torch.empty_like(lse), *_residual_buffers(q, residual_dtype))


def _block_mass_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    kv_len: torch.Tensor | None,
) -> torch.Tensor:
    from .triton_mass import block_mass_fwd

    return block_mass_fwd(q, k, lse, block_q, block_k, scale, kv_len)


_block_mass_op = torch.library.custom_op("dit_accel::block_mass", _block_mass_impl, mutates_args=())


@_block_mass_op.register_fake
def _(q, k, lse, block_q, block_k, scale, kv_len):
    n_qb = -(-q.shape[2] // block_q)
    n_kb = -(-k.shape[2] // block_k)
    return q.new_empty((q.shape[0], q.shape[1], n_qb, n_kb), dtype=torch.float32)


def _rotary_qk_impl(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, convention: str, rotary_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_rotary import rotary_qk_fwd

    return rotary_qk_fwd(q, k, cos, sin, convention, rotary_len)


_rotary_qk_op = torch.library.custom_op("dit_accel::rotary_qk", _rotary_qk_impl, mutates_args=())


@_rotary_qk_op.register_fake
def _(q, k, cos, sin, convention, rotary_len):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


def _plain_eager(*tensors) -> bool:
    """Whether a Triton launcher can be called directly instead of through its custom op: not tracing or
    compiling, no torch function or dispatch mode, plain tensors only. The custom ops exist so torch.compile
    and fake-tensor tracing see one opaque node; in plain eager their dispatch is host time a host-bound model
    pays on every attention call."""
    return (
        not torch.compiler.is_compiling()
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._len_torch_dispatch_stack() == 0
        and all(t is None or type(t) is torch.Tensor for t in tensors)
    )


def _run(impl, op, *args):
    """``impl(*args)`` in plain eager (see :func:`_plain_eager`), else its registered custom ``op``."""
    direct = _plain_eager(*(a for a in args if isinstance(a, torch.Tensor)))
    return (impl if direct else op)(*args)


def _plan_call(qh, kh, vh, plan: BlockPlan, scale: float, kv_len) -> tuple:
    """The leading arguments of the sparse and refresh launchers: q, k, v, the plan's tensors and blocks."""
    return qh, kh, vh, plan.kv_indices, plan.kv_counts, plan.block_q, plan.block_k, scale, kv_len


def _from_bhsd(out: torch.Tensor, layout: str) -> torch.Tensor:
    return out.transpose(1, 2) if layout == "bshd" else out


# --------------------------------------------------------------------------------------------------
# public ops
# --------------------------------------------------------------------------------------------------
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
    kv_len: torch.Tensor | None = None,
    layout: str = "bshd",
    backend: str = "auto",
    correction: SoftmaxCorrection | None = None,
    rho_offset: float | torch.Tensor = 0.0,
    clamp_rho: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse softmax attention with the per-row log-sum-exp, optionally corrected (re-ttention).

    Args:
        q: [B, S_q, H, D] ("bshd", diffusers' dispatch layout) or [B, H, S_q, D] ("bhsd", SDPA's); any
            strides with a contiguous last dim. fp16 or bf16 (fp32 on the torch backend).
        k, v: like q with S_k tokens.
        plan: BlockPlan with B and H equal to q's or 1 (broadcast); ceil(S_q / block_q) query blocks and
            ceil(S_k / block_k) key blocks. Triton needs power-of-two block sizes >= 16.
        scale: softmax scale, default 1/sqrt(D).
        kv_len: optional valid key count per batch element (an int, a list or an integer tensor [B],
            values >= 0): keys at or past kv_len[b] are ignored; values past S_k mean every key.
        layout: "bshd" or "bhsd".
        backend: "auto", "triton" or "torch".
        correction: statistics from :func:`refresh_attention` with the same plan; the output becomes
            ``min(rho + rho_offset, 1) * O_sparse + R`` (``clamp_rho=False``: no cap), in one pass.
        rho_offset: added to rho (re-ttention's ramp): a float, or a one-element float32 tensor on q's
            device whose value is read on the device when the kernel runs (so a CUDA graph that captured
            the call replays it with the tensor's current value).
        clamp_rho: cap rho + rho_offset at 1.

    Returns:
        out in q's layout and dtype; lse fp32 [B, H, S_q] (natural log; the sparse one, also when corrected).
        A row with no key gets out 0 (R when corrected) and lse -inf.
    """
    key = _sparse_call_key(q, k, v, plan, scale, kv_len, layout, backend, correction, rho_offset, clamp_rho)
    if key is not None:
        hit = _CALLS.get(key)
        if hit is not None and hit.plan() is plan:
            return hit(q, k, v, plan, correction, rho_offset)
    qh, kh, vh, kv_len, scale = _check_inputs(q, k, v, layout, kv_len, scale)
    _check_plan(plan, qh, kh)
    if correction is not None:
        _check_correction(correction, qh)
    offset_t = _check_rho_offset(rho_offset, qh)
    grad = _needs_grad(qh, kh, vh, *((correction.rho, correction.residual) if correction is not None else ()))
    if _pick(backend, qh, "block_sparse_attention", (plan.block_q, plan.block_k), grad) == "torch":
        tensors = (qh, kh, vh, *(correction.tensors().values() if correction is not None else ()))
        if torch_sparse.available(*tensors):
            out, lse = torch_sparse.sparse_attention(qh.float(), kh.float(), vh.float(), plan, scale, kv_len)
            if correction is not None:
                out = reference.apply_correction(
                    out, correction.rho, correction.residual, correction.residual_scale, rho_offset, clamp_rho
                )
            out = out.to(qh.dtype)
        elif correction is None:
            out, lse = reference.attention_reference(qh, kh, vh, plan, scale, kv_len)
        else:
            out, lse = reference.corrected_reference(
                qh,
                kh,
                vh,
                plan,
                scale,
                correction.rho,
                correction.residual,
                correction.residual_scale,
                kv_len,
                rho_offset,
                clamp_rho,
            )
    else:
        corr = correction.tensors() if correction is not None else {}
        with _recording(key) as launches:
            out, lse = _run(
                _sparse_attention_impl,
                _sparse_attention_op,
                *_plan_call(qh, kh, vh, plan, scale, kv_len),
                corr.get("rho"),
                corr.get("residual"),
                corr.get("residual_scale"),
                0.0 if offset_t is not None else float(rho_offset),
                bool(clamp_rho),
                offset_t,
            )
        out = _from_bhsd(out, layout)
        _remember(key, launches, _SparseCall.record, q, k, v, plan, correction, rho_offset, out, lse)
        return out, lse
    return _from_bhsd(out, layout), lse


# --------------------------------------------------------------------------------------------------
# repeated calls
# --------------------------------------------------------------------------------------------------
# A call whose inputs match an earlier call's in everything the checks and the launcher read from them
# (shapes, strides, dtypes, devices, 16-byte alignment, the plan object, every option) launches that call's
# recorded kernel again with its own tensors: at short sequences (the embedded model: 2,496 tokens, ~20 us of
# GPU time a call) the checks, the launcher's Python and Triton's launch path cost several times the kernel,
# and the GPU waits for the host. DIT_ACCEL_CALL_CACHE=0 turns it off.
_CALL_CACHE = os.environ.get("DIT_ACCEL_CALL_CACHE", "1") != "0"
_CALLS: dict = {}
_CALLS_MAX = 1024
_triton_common = None


def _launch_context() -> tuple:
    global _triton_common
    if _triton_common is None:
        from . import triton_common

        _triton_common = triton_common
    return _triton_common.launch_context()


def _cacheable(backend: str, q: torch.Tensor, *tensors) -> bool:
    """Whether a call could run on the Triton kernels in plain eager, the only calls the cache takes."""
    return (
        _CALL_CACHE
        and _TRITON_IMPORT_ERROR is None
        and backend in ("auto", "triton")
        and _plain_eager(q, *tensors)
        and (q.is_cuda or _interpret())
    )


def _tensor_key(t: torch.Tensor) -> tuple:
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16, t.requires_grad


def _plan_call_key(q, k, v, plan, scale, kv_len, layout, backend) -> tuple | None:
    """What the cache keys of the sparse, refresh, statistics and dense (``plan`` None) calls share, or None
    where the call is not cached (the cache is off, a ``kv_len``, the torch backend, a tensor subclass, a
    dispatch mode or compilation, an option of a type the checks would refuse, a head dim not contiguous)."""
    if (
        not _cacheable(backend, q, k, v)
        or kv_len is not None
        or (plan is not None and type(plan) is not BlockPlan)
        or not (scale is None or type(scale) in (float, int))
        or q.stride(-1) != 1
        or k.stride(-1) != 1
        or v.stride(-1) != 1
    ):
        return None
    return (
        id(plan), layout, backend, scale, torch.is_grad_enabled(),
        _tensor_key(q), _tensor_key(k), _tensor_key(v), _launch_context(),
    )  # fmt: skip


def _sparse_call_key(q, k, v, plan, scale, kv_len, layout, backend, correction, rho_offset, clamp_rho):
    """The cache key of a :func:`block_sparse_attention` call, or None where the call is not cached (see
    :func:`_plan_call_key`)."""
    if not (type(rho_offset) in (float, int) or type(rho_offset) is torch.Tensor) or not (
        correction is None or type(correction) is SoftmaxCorrection
    ):
        return None
    base = _plan_call_key(q, k, v, plan, scale, kv_len, layout, backend)
    if base is None:
        return None
    if correction is None:
        corr = None
    else:
        corr = (_tensor_key(correction.rho), _tensor_key(correction.residual))
        if correction.residual_scale is not None:
            corr += (_tensor_key(correction.residual_scale),)
    offset = _tensor_key(rho_offset) if type(rho_offset) is torch.Tensor else rho_offset
    return (*base, bool(clamp_rho), offset, corr)


def _refresh_call_key(q, k, v, plan, scale, kv_len, layout, backend, residual_dtype):
    """The cache key of a :func:`refresh_attention` call, or None (see :func:`_plan_call_key`). It holds the
    refresh kernel's walk threshold (``triton_refresh.MASKED_WALK_MAX_BLOCK``), which the launch reads."""
    if not (residual_dtype is None or type(residual_dtype) is torch.dtype):
        return None
    base = _plan_call_key(q, k, v, plan, scale, kv_len, layout, backend)
    if base is None:
        return None
    from .triton_refresh import MASKED_WALK_MAX_BLOCK

    return ("refresh", residual_dtype, MASKED_WALK_MAX_BLOCK, *base)


def _stats_call_key(q, k, v, plan, out, lse, scale, kv_len, layout, backend, residual_dtype):
    """The cache key of a :func:`mask_statistics` call, or None (see :func:`_plan_call_key`)."""
    if not (residual_dtype is None or type(residual_dtype) is torch.dtype) or not _plain_eager(out, lse):
        return None
    base = _plan_call_key(q, k, v, plan, scale, kv_len, layout, backend)
    if base is None or out.stride(-1) != 1 or not lse.is_contiguous():
        return None
    return ("stats", residual_dtype, _tensor_key(out), _tensor_key(lse), *base)


def _dense_call_key(q, k, v, scale, kv_len, layout, backend, return_lse):
    """The cache key of a :func:`dense_attention` call, or None (see :func:`_plan_call_key`). Only a call
    that ran our Triton dense loop is ever stored under it: one whose backend choice went elsewhere (cuDNN,
    xformers) is looked up, missed and run as before."""
    base = _plan_call_key(q, k, v, None, scale, kv_len, layout, backend)
    return None if base is None else ("dense", bool(return_lse), *base)


@contextlib.contextmanager
def _recording(key):
    """The launches made inside the block where ``key`` is a cache key not cached yet, else None."""
    if key is None:
        yield None
        return
    with _triton_common.recording() as launches:  # loaded by the key's _launch_context()
        yield launches


def _remember(key, launches, record, *args) -> None:
    """Keep ``record(launch, *args)`` (a cached call, or None where it cannot replay) under ``key`` when the
    block watched by :func:`_recording` made exactly one launch (a first call that tuned made several)."""
    if launches is None or len(launches) != 1:
        return
    call = record(launches[0], *args)
    if call is None:
        return
    if len(_CALLS) >= _CALLS_MAX:
        _CALLS.clear()
    _CALLS[key] = call


def _no_plan():
    return None


class _SparseCall:
    """A cached :func:`block_sparse_attention` call (or :func:`dense_attention` call on the Triton kernel,
    ``plan`` None): allocates the outputs as the recorded call did and replays its launch with this call's
    tensors. Holds the plan weakly (the key has its id; a new plan with a reused id is a miss) and no tensor
    of the recorded call."""

    __slots__ = ("plan", "replay", "out_shape", "out_stride", "lse_shape")

    @staticmethod
    def _roles(q, k, v, out, lse, plan, correction, rho_offset) -> tuple:
        c = correction
        idx, cnt = (
            (plan.kv_indices, plan.kv_counts)
            if plan is not None
            else _triton_common.plan_args(None, None, q.device)[:2]
        )
        return (
            q, k, v, out, lse, idx, cnt,
            c.rho if c is not None else None,
            c.residual if c is not None else None,
            c.residual_scale if c is not None else None,
            rho_offset if type(rho_offset) is torch.Tensor else None,
        )  # fmt: skip

    @classmethod
    def record(cls, launch, q, k, v, plan, correction, rho_offset, out, lse) -> _SparseCall | None:
        replay = _triton_common.Replay.of(launch, cls._roles(q, k, v, out, lse, plan, correction, rho_offset))
        if replay is None or out.storage_offset() or lse.storage_offset() or not lse.is_contiguous():
            return None
        call = cls()
        call.plan, call.replay = weakref.ref(plan) if plan is not None else _no_plan, replay
        call.out_shape, call.out_stride, call.lse_shape = out.shape, out.stride(), lse.shape
        return call

    def __call__(self, q, k, v, plan, correction, rho_offset):
        out = torch.empty_strided(self.out_shape, self.out_stride, dtype=q.dtype, device=q.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=q.device)
        self.replay(self._roles(q, k, v, out, lse, plan, correction, rho_offset))
        return out, lse


class _RefreshCall:
    """A cached :func:`refresh_attention` call on the Triton kernel (see :class:`_SparseCall`)."""

    __slots__ = (
        "plan",
        "replay",
        "out_shape",
        "out_stride",
        "rows",
        "residual_shape",
        "residual_dtype",
        "fp8",
    )

    @staticmethod
    def _roles(q, k, v, plan, out, lse, rho, residual, residual_scale) -> tuple:
        return (q, k, v, out, lse, rho, residual, residual_scale, plan.kv_indices, plan.kv_counts)

    @classmethod
    def record(cls, launch, q, k, v, plan, out, lse, corr: SoftmaxCorrection) -> _RefreshCall | None:
        roles = cls._roles(q, k, v, plan, out, lse, corr.rho, corr.residual, corr.residual_scale)
        replay = _triton_common.Replay.of(launch, roles)
        rows = (
            lse,
            corr.rho,
            corr.residual,
            *((corr.residual_scale,) if corr.residual_scale is not None else ()),
        )
        if (
            replay is None
            or out.storage_offset()
            or not all(t.is_contiguous() and not t.storage_offset() for t in rows)
        ):
            return None
        call = cls()
        call.plan, call.replay = weakref.ref(plan), replay
        call.out_shape, call.out_stride, call.rows = out.shape, out.stride(), lse.shape
        call.residual_shape, call.residual_dtype = corr.residual.shape, corr.residual.dtype
        call.fp8 = corr.residual_scale is not None
        return call

    def __call__(self, q, k, v, plan):
        device = q.device
        out = torch.empty_strided(self.out_shape, self.out_stride, dtype=q.dtype, device=device)
        lse = torch.empty(self.rows, dtype=torch.float32, device=device)
        rho = torch.empty(self.rows, dtype=torch.float32, device=device)
        residual = torch.empty(self.residual_shape, dtype=self.residual_dtype, device=device)
        r_scale = torch.empty(self.rows, dtype=torch.float32, device=device) if self.fp8 else None
        self.replay(self._roles(q, k, v, plan, out, lse, rho, residual, r_scale))
        return out, lse, SoftmaxCorrection(rho, residual, r_scale)


class _StatsCall:
    """A cached :func:`mask_statistics` call on the Triton kernel (see :class:`_SparseCall`)."""

    __slots__ = ("plan", "replay", "rows", "residual_shape", "residual_dtype", "fp8")

    @staticmethod
    def _roles(q, k, v, plan, out, lse, rho, residual, residual_scale) -> tuple:
        return (q, k, v, out, lse, rho, residual, residual_scale, plan.kv_indices, plan.kv_counts)

    @classmethod
    def record(cls, launch, q, k, v, plan, out, lse, corr: SoftmaxCorrection) -> _StatsCall | None:
        roles = cls._roles(q, k, v, plan, out, lse, corr.rho, corr.residual, corr.residual_scale)
        replay = _triton_common.Replay.of(launch, roles)
        if replay is None or not all(
            t is None or (t.is_contiguous() and not t.storage_offset()) for t in roles[5:8]
        ):
            return None
        call = cls()
        call.plan, call.replay, call.rows = weakref.ref(plan), replay, corr.rho.shape
        call.residual_shape, call.residual_dtype = corr.residual.shape, corr.residual.dtype
        call.fp8 = corr.residual_scale is not None
        return call

    def __call__(self, q, k, v, plan, out, lse) -> SoftmaxCorrection:
        device = q.device
        rho = torch.empty(self.rows, dtype=torch.float32, device=device)
        residual = torch.empty(self.residual_shape, dtype=self.residual_dtype, device=device)
        r_scale = torch.empty(self.rows, dtype=torch.float32, device=device) if self.fp8 else None
        self.replay(self._roles(q, k, v, plan, out, lse, rho, residual, r_scale))
        return SoftmaxCorrection(rho, residual, r_scale)


def _check_rho_offset(rho_offset, qh: torch.Tensor) -> torch.Tensor | None:
    """The offset as a one-element tensor for the kernel, or None for a number."""
    if not isinstance(rho_offset, torch.Tensor):
        return None
    if rho_offset.numel() != 1 or rho_offset.dtype != torch.float32 or rho_offset.device != qh.device:
        raise ValueError(
            f"rho_offset must be a number or a one-element float32 tensor on {qh.device}, got a "
            f"{rho_offset.dtype} tensor of shape {tuple(rho_offset.shape)} on {rho_offset.device}"
        )
    return rho_offset.reshape(())


def _check_correction(correction: SoftmaxCorrection, qh: torch.Tensor) -> None:
    if not isinstance(correction, SoftmaxCorrection):
        raise ValueError(f"correction must be a SoftmaxCorrection, got {type(correction).__name__}")
    if tuple(correction.residual.shape) != tuple(qh.shape):
        raise ValueError(
            f"correction residual {tuple(correction.residual.shape)} does not match the attention "
            f"[B, H, S_q, D]={tuple(qh.shape)}"
        )
    if correction.device != qh.device or correction.rho.device != qh.device:
        raise ValueError(f"correction is on {correction.device}, q is on {qh.device}")
    if correction.residual.stride(-1) != 1 or not correction.rho.is_contiguous():
        raise ValueError("correction tensors must be contiguous (as refresh_attention returns them)")


def refresh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
    kv_len: torch.Tensor | None = None,
    layout: str = "bshd",
    backend: str = "auto",
    residual_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, SoftmaxCorrection]:
    """Dense attention and, in the same pass over the keys, the statistics of ``plan``'s mask (re-ttention).

    Args:
        q, k, v, plan, scale, kv_len, layout, backend: as in :func:`block_sparse_attention`.
        residual_dtype: storage dtype of the residual R: float32, bfloat16, float16 or float8_e4m3fn
            (per-row scaled); default q's dtype.

    Returns:
        out: the dense attention output (q's layout and dtype); lse: fp32 [B, H, S_q] of the full rows;
        correction: :class:`SoftmaxCorrection` with rho = exp(LSE_in - LSE) and R = out - rho * O_in
        (exactly the out-of-mask contribution), to pass to :func:`block_sparse_attention` with the same
        plan at later steps.
    """
    key = _refresh_call_key(q, k, v, plan, scale, kv_len, layout, backend, residual_dtype)
    if key is not None:
        hit = _CALLS.get(key)
        if hit is not None and hit.plan() is plan:
            return hit(q, k, v, plan)
    qh, kh, vh, kv_len, scale = _check_inputs(q, k, v, layout, kv_len, scale)
    _check_plan(plan, qh, kh)
    residual_dtype = residual_dtype or qh.dtype
    if residual_dtype not in RESIDUAL_DTYPES:
        raise ValueError(f"residual_dtype must be one of {RESIDUAL_DTYPES}, got {residual_dtype}")
    grad = _needs_grad(qh, kh, vh)
    if _pick(backend, qh, "refresh_attention", (plan.block_q, plan.block_k), grad) == "torch":
        if torch_sparse.available(qh, kh, vh):
            qf, kf, vf = qh.float(), kh.float(), vh.float()
            out, lse = torch_sparse.dense_attention(qf, kf, vf, scale, kv_len)
            out_in, lse_in = torch_sparse.sparse_attention(qf, kf, vf, plan, scale, kv_len)
            rho, resid, r_scale = reference.refresh_statistics(out, lse, out_in, lse_in, residual_dtype)
            out = out.to(qh.dtype)
        else:
            out, lse, rho, resid, r_scale = reference.refresh_reference(
                qh, kh, vh, plan, scale, kv_len, residual_dtype
            )
        resid = resid.contiguous()
    else:
        with _recording(key) as launches:
            out, lse, rho, resid, r_scale = _run(
                _refresh_attention_impl,
                _refresh_attention_op,
                *_plan_call(qh, kh, vh, plan, scale, kv_len),
                residual_dtype,
            )
        out = _from_bhsd(out, layout)
        corr = SoftmaxCorrection(rho, resid, r_scale if r_scale.numel() else None)
        _remember(key, launches, _RefreshCall.record, q, k, v, plan, out, lse, corr)
        return out, lse, corr
    return _from_bhsd(out, layout), lse, SoftmaxCorrection(rho, resid, r_scale)


def mask_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float | None = None,
    kv_len: torch.Tensor | None = None,
    layout: str = "bshd",
    backend: str = "auto",
    residual_dtype: torch.dtype | None = None,
) -> SoftmaxCorrection:
    """The statistics of ``plan``'s mask given a dense pass over the same q, k, v: one pass over the plan's
    blocks whose epilogue writes rho and R (re-ttention's two-pass refresh, after a dense attention that
    returned its LSE; :func:`refresh_attention` does both in one pass).

    Args:
        q, k, v, plan, scale, kv_len, layout, backend: as in :func:`block_sparse_attention`.
        out, lse: the dense output (``layout``, q's shape, any float dtype) and its fp32 LSE [B, H, S_q]
            (natural log, -inf for a row with no key), e.g. from :func:`dense_attention`.
        residual_dtype: storage dtype of R (default ``out``'s dtype); float8 gets a per-row scale.

    Returns:
        :class:`SoftmaxCorrection` with rho = exp(LSE_in - LSE) and R = out - rho * O_in, as
        :func:`correction_from_outputs` computes them from a separate sparse pass.
    """
    key = _stats_call_key(q, k, v, plan, out, lse, scale, kv_len, layout, backend, residual_dtype)
    if key is not None:
        hit = _CALLS.get(key)
        if hit is not None and hit.plan() is plan:
            return hit(q, k, v, plan, out, lse)
    qh, kh, vh, kv_len, scale = _check_inputs(q, k, v, layout, kv_len, scale)
    _check_plan(plan, qh, kh)
    oh = _to_bhsd(out, layout, "out")
    if oh.shape != qh.shape or oh.device != qh.device or not oh.is_floating_point():
        raise ValueError(
            f"out must be the dense output: a float tensor of q's shape on {qh.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if lse.shape != qh.shape[:3] or lse.dtype != torch.float32 or lse.device != qh.device:
        raise ValueError(
            f"lse must be fp32 [B, H, S_q]={tuple(qh.shape[:3])} on {qh.device}, got {lse.dtype} "
            f"{tuple(lse.shape)} on {lse.device}"
        )
    residual_dtype = residual_dtype or out.dtype
    if residual_dtype not in RESIDUAL_DTYPES:
        raise ValueError(f"residual_dtype must be one of {RESIDUAL_DTYPES}, got {residual_dtype}")
    grad = _needs_grad(qh, kh, vh, oh, lse)
    if _pick(backend, qh, "mask_statistics", (plan.block_q, plan.block_k), grad) == "torch":
        qf, kf, vf = qh.float(), kh.float(), vh.float()
        if torch_sparse.available(qf, kf, vf):
            out_in, lse_in = torch_sparse.sparse_attention(qf, kf, vf, plan, scale, kv_len)
        else:
            out_in, lse_in = reference.attention_reference(qf, kf, vf, plan, scale, kv_len)
        rho, resid, r_scale = reference.refresh_statistics(oh.float(), lse, out_in, lse_in, residual_dtype)
        return SoftmaxCorrection(rho.float().contiguous(), resid.contiguous(), r_scale)
    if oh.stride(-1) != 1:
        oh = oh.contiguous()
    with _recording(key) as launches:
        rho, resid, r_scale = _run(
            _mask_statistics_impl,
            _mask_statistics_op,
            *_plan_call(qh, kh, vh, plan, scale, kv_len),
            oh,
            lse.contiguous(),
            residual_dtype,
        )
    corr = SoftmaxCorrection(rho, resid, r_scale if r_scale.numel() else None)
    _remember(key, launches, _StatsCall.record, q, k, v, plan, out, lse, corr)
    return corr


# --------------------------------------------------------------------------------------------------
# dense backends
# --------------------------------------------------------------------------------------------------
_DENSE_BACKENDS = ("auto", "cudnn", "xformers", "triton", "torch")

# "auto" on CUDA: the dense backends in measured order, fastest first, per (compute capability major,
# head_dim band, sequence band, needs_lse, has_kv_len). Each row names the benchmark result it comes from.
# A key with no row was not measured: auto then runs our Triton kernel (the torch reference where Triton
# cannot run). A listed backend that cannot run a call (not installed, head_dim, kv_len) is skipped with
# a logged reason. A backend is listed only where a benchmark on that device timed it at that band:
# re-measure with benchmarks/bench_dense.py and edit the rows by hand.
_DENSE_TABLE: dict[tuple[int, str, str, bool, bool], tuple[str, ...]] = {
    # benchmarks/results/dense_nvidia_h200.json (bench_dense.py; every path checked against the fp32
    # reference before timing; xformers could not load its extension there, so it has no row yet).
    # cogvideox5b_49f (S 17,776, D 64): our dense loop 8.93 ms, 8.98 ms with LSE; cuDNN 9.24 / 9.25 ms.
    (9, "d<=64", "s>8k", True, False): ("triton", "cudnn"),
    (9, "d<=64", "s>8k", False, False): ("triton", "cudnn"),
    # flux_1024 (S 4,608, D 128): cuDNN 0.430 ms, 0.426 ms with LSE; ours 0.553 / 0.556 ms.
    (9, "d65-128", "s<=8k", True, False): ("cudnn", "triton"),
    (9, "d65-128", "s<=8k", False, False): ("cudnn", "triton"),
    # pixart_2k (S 16,384, D 72): cuDNN 3.43 / 3.46 ms, ours 4.39 / 4.32 ms; wan1.3b_480p_81f,
    # wan14b_720p_81f, hunyuan_720p_129f (S 32,760-119,056, D 128): cuDNN 10-13% faster than ours.
    (9, "d65-128", "s>8k", True, False): ("cudnn", "triton"),
    (9, "d65-128", "s>8k", False, False): ("cudnn", "triton"),
    # hunyuan_720p_129f_kvlen (S 119,056, D 128, the last 192 keys padding): cuDNN on the valid key prefix
    # against our loop's masked tail.
    (9, "d65-128", "s>8k", True, True): ("cudnn", "triton"),
    (9, "d65-128", "s>8k", False, True): ("cudnn", "triton"),
}


def _head_dim_band(d: int) -> str:
    return "d<=64" if d <= 64 else "d65-128" if d <= 128 else "d129-256"


def _seq_band(s: int) -> str:
    return "s<=8k" if s <= 8192 else "s>8k"


def _dense_table_key(
    capability_major: int, head_dim: int, seq: int, needs_lse: bool, has_kv_len: bool
) -> tuple[int, str, str, bool, bool]:
    """The key of ``_DENSE_TABLE`` for a dense call (``seq``: query tokens)."""
    return (capability_major, _head_dim_band(head_dim), _seq_band(seq), bool(needs_lse), bool(has_kv_len))


def _dense_auto_order(
    capability_major: int, head_dim: int, seq: int, needs_lse: bool, has_kv_len: bool
) -> tuple[str, ...]:
    """The measured order "auto" tries on a CUDA device of this capability (empty: not measured)."""
    return _DENSE_TABLE.get(_dense_table_key(capability_major, head_dim, seq, needs_lse, has_kv_len), ())


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.cache
def _log_once(msg: str) -> None:
    logger.info(msg)


def _cudnn_unavailable_reason(qh: torch.Tensor, kv_len) -> str | None:
    if not qh.is_cuda:
        return f"tensors are on {qh.device}"
    if qh.dtype not in _HALF:
        return f"dtype {qh.dtype}"
    if kv_len is not None and torch.compiler.is_compiling():
        return "kv_len under torch.compile (the cuDNN path reads the lengths on the host)"
    if qh.shape[3] % 8 or qh.shape[3] > 128:
        return f"head_dim {qh.shape[3]}"
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available"
    return None


def _cudnn_attention(qh, kh, vh, scale, return_lse: bool, kv_len: torch.Tensor | None = None):
    """cuDNN attention; ``kv_len`` runs it on each batch element's valid key prefix (the keys past it are
    sliced off, never masked), one call for all elements when their lengths agree. Reading the lengths
    syncs with the host once per call."""
    if kv_len is not None:
        lengths = kv_len.tolist()
        if len(set(lengths)) == 1:
            n = lengths[0]
            if n > 0:
                return _cudnn_call(qh, kh[:, :, :n], vh[:, :, :n], scale, return_lse)
        parts = [
            _cudnn_call(qh[b : b + 1], kh[b : b + 1, :, :n], vh[b : b + 1, :, :n], scale, return_lse)
            if n > 0
            else _no_keys(qh[b : b + 1], vh, return_lse)
            for b, n in enumerate(lengths)
        ]
        out = torch.cat([o for o, _ in parts])
        return out, (torch.cat([lse for _, lse in parts]) if return_lse else None)
    return _cudnn_call(qh, kh, vh, scale, return_lse)


def _cudnn_call(qh, kh, vh, scale, return_lse: bool):
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        qh, kh, vh, None, return_lse, 0.0, False, False, scale=scale
    )
    if not return_lse:
        return res[0], None
    lse = res[1]
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    return res[0], lse.float()


def _no_keys(qh, vh, return_lse: bool):
    """A batch element with no valid key: output 0, lse -inf (as the kernels write it)."""
    b, h, s, _ = qh.shape
    out = qh.new_zeros(b, h, s, vh.shape[3])
    lse = torch.full((b, h, s), float("-inf"), device=qh.device) if return_lse else None
    return out, lse


def _dense_unavailable_reason(backend: str, qh, kh, vh, kv_len, scale: float, needs_lse: bool):
    if backend == "cudnn":
        return _cudnn_unavailable_reason(qh, kv_len)
    if backend == "xformers":
        from . import xformers_attention

        return xformers_attention.unavailable_reason(qh, kh, vh, kv_len, scale, needs_lse)
    if backend == "triton":
        return _triton_unavailable_reason(qh)
    return None


def _first_runnable(order: tuple[str, ...], reason_of) -> str | None:
    """The first backend of ``order`` that ``reason_of`` finds no reason against; skips are logged once."""
    for candidate in order:
        reason = reason_of(candidate)
        if reason is None:
            return candidate
        _log_once(f"dense_attention: auto skips {candidate!r} (measured faster here): {reason}")
    return None


def _pick_dense(backend: str, qh, kh, vh, kv_len, scale: float, needs_lse: bool) -> str:
    if backend not in _DENSE_BACKENDS:
        raise ValueError(f"backend must be one of {_DENSE_BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend in ("cudnn", "xformers"):
            reason = _dense_unavailable_reason(backend, qh, kh, vh, kv_len, scale, needs_lse)
            if reason is not None:
                raise RuntimeError(f"dense_attention: backend={backend!r} cannot run: {reason}")
            return backend
        return _pick(backend, qh, "dense_attention", grad=_needs_grad(qh, kh, vh))
    if qh.is_cuda:
        index = qh.device.index if qh.device.index is not None else torch.cuda.current_device()
        order = _dense_auto_order(
            _capability_major(index), qh.shape[3], qh.shape[2], needs_lse, kv_len is not None
        )
        chosen = _first_runnable(
            order, lambda b: _dense_unavailable_reason(b, qh, kh, vh, kv_len, scale, needs_lse)
        )
        if chosen is not None:
            return chosen
    return _pick("auto", qh, "dense_attention", grad=_needs_grad(qh, kh, vh))


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    kv_len: torch.Tensor | None = None,
    layout: str = "bshd",
    backend: str = "auto",
    return_lse: bool = True,
):
    """Dense softmax attention, with the per-row log-sum-exp (dense steps and pattern searches).

    Same arguments as :func:`block_sparse_attention` without a plan, and:

    Args:
        backend: "auto", "cudnn" (PyTorch's cuDNN attention through ``torch.ops.aten``), "xformers"
            (``xformers.ops.fmha``; the ``xformers`` extra), "triton" (our dense loop; CUDA, or CPU under
            ``TRITON_INTERPRET=1``) or "torch" (the fp32 reference). "auto" on CUDA tries the backends a
            benchmark measured fastest on this device at this head_dim and sequence band, with or without
            the LSE and kv_len (a table in this module), skipping any that cannot run the call with a logged
            reason, then our Triton kernel; elsewhere it runs Triton where it can, else the reference.
            A named backend that cannot run the call raises RuntimeError; it never falls back.
        return_lse: False returns the output only, which lets cuDNN and xformers skip writing the LSE.

    Returns:
        ``(out, lse)`` as :func:`block_sparse_attention` (every key counts), or ``out`` when
        ``return_lse`` is False.
    """
    key = _dense_call_key(q, k, v, scale, kv_len, layout, backend, return_lse)
    if key is not None:
        hit = _CALLS.get(key)
        if hit is not None:
            out, lse = hit(q, k, v, None, None, 0.0)
            return (out, lse) if return_lse else out
    qh, kh, vh, kv_len, scale = _check_inputs(q, k, v, layout, kv_len, scale)
    chosen = _pick_dense(backend, qh, kh, vh, kv_len, scale, return_lse)
    if chosen == "cudnn":
        out, lse = _cudnn_attention(qh, kh, vh, scale, return_lse, kv_len)
    elif chosen == "xformers":
        from .xformers_attention import xformers_attention

        out, lse = xformers_attention(qh, kh, vh, scale, return_lse)
    elif chosen == "torch":
        if torch_sparse.available(qh, kh, vh):
            out, lse = torch_sparse.dense_attention(qh, kh, vh, scale, kv_len)
        else:
            out, lse = reference.attention_reference(qh, kh, vh, None, scale, kv_len)
    else:
        block = 16 if _interpret() else 128
        with _recording(key) as launches:
            out, lse = _run(
                _sparse_attention_impl,
                _sparse_attention_op,
                qh,
                kh,
                vh,
                None,
                None,
                block,
                block,
                scale,
                kv_len,
            )
        out = _from_bhsd(out, layout)
        _remember(key, launches, _SparseCall.record, q, k, v, None, None, 0.0, out, lse)
        return (out, lse) if return_lse else out
    out = _from_bhsd(out, layout)
    return (out, lse) if return_lse else out


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_q: int,
    block_k: int,
    *,
    scale: float | None = None,
    kv_len: torch.Tensor | None = None,
    layout: str = "bshd",
    backend: str = "auto",
) -> torch.Tensor:
    """Attention mass per (query block, key block) under a given log-sum-exp. No P.V is computed.

    Args:
        q, k: as in :func:`block_sparse_attention`.
        lse: fp32 [B, H, S_q], e.g. from :func:`dense_attention` on the same q, k (exact mass) or from an
            earlier step (cached search). Rows with lse = -inf contribute nothing.
        block_q, block_k: block sizes (powers of two >= 16 on the Triton backend).

    Returns:
        W fp32 [B, H, ceil(S_q / block_q), ceil(S_k / block_k)], W[b, h, p, c] =
        sum_{i in block p, j in block c, j < kv_len[b]} exp(q_i . k_j * scale - lse_i).
    """
    key = _mass_call_key(q, k, lse, block_q, block_k, scale, kv_len, layout, backend)
    if key is not None:
        hit = _CALLS.get(key)
        if hit is not None:
            return hit(q, k, lse)
    qh, kh, _, kv_len, scale = _check_inputs(q, k, None, layout, kv_len, scale)
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(qh.shape[:3]):
        raise ValueError(f"lse must be a tensor of shape [B, H, S_q]={tuple(qh.shape[:3])}")
    if lse.device != qh.device:
        raise ValueError(f"lse is on {lse.device}, q is on {qh.device}")
    if lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32, got {lse.dtype}")
    block_q, block_k = _check_block_size("block_q", block_q), _check_block_size("block_k", block_k)
    if _pick(backend, qh, "block_mass", (block_q, block_k)) == "torch":
        if torch_sparse.available(qh, kh, lse):
            return torch_sparse.block_mass(qh, kh, lse, block_q, block_k, scale, kv_len)
        return reference.block_mass_reference(qh, kh, lse, block_q, block_k, scale, kv_len)
    with _recording(key) as launches:
        w = _run(_block_mass_impl, _block_mass_op, qh, kh, lse, block_q, block_k, scale, kv_len)
    _remember(key, launches, _MassCall.record, q, k, lse, w)
    return w


def _mass_call_key(q, k, lse, block_q, block_k, scale, kv_len, layout, backend):
    """The cache key of a :func:`block_mass` call, or None (see :func:`_plan_call_key`)."""
    if (
        type(lse) is not torch.Tensor
        or not _cacheable(backend, q, k, lse)
        or kv_len is not None
        or type(block_q) is not int
        or type(block_k) is not int
        or not (scale is None or type(scale) in (float, int))
        or q.stride(-1) != 1
        or k.stride(-1) != 1
    ):
        return None
    return (
        "mass", block_q, block_k, layout, backend, scale, torch.is_grad_enabled(),
        _tensor_key(q), _tensor_key(k), _tensor_key(lse), _launch_context(),
    )  # fmt: skip


class _MassCall:
    """A cached :func:`block_mass` call on the Triton kernel (see :class:`_SparseCall`)."""

    __slots__ = ("replay", "shape")

    @classmethod
    def record(cls, launch, q, k, lse, w) -> _MassCall | None:
        replay = _triton_common.Replay.of(launch, (q, k, lse, w))
        if replay is None or not w.is_contiguous() or w.storage_offset():
            return None
        call = cls()
        call.replay, call.shape = replay, w.shape
        return call

    def __call__(self, q, k, lse):
        w = torch.empty(self.shape, dtype=torch.float32, device=q.device)
        self.replay((q, k, lse, w))
        return w


def _rotary_call_key(q, k, cos, sin, backend, convention, rotary_len):
    """The cache key of a :func:`rotary_interleaved` call (see :func:`_sparse_call_key`), or None."""
    if not _cacheable(backend, q, k, cos, sin) or not (rotary_len is None or type(rotary_len) is int):
        return None
    return (
        "rotary", backend, convention, rotary_len, torch.is_grad_enabled(),
        _tensor_key(q), _tensor_key(k), _tensor_key(cos), _tensor_key(sin), _launch_context(),
    )  # fmt: skip


class _RotaryCall:
    """A cached :func:`rotary_interleaved` call on the Triton kernel (see :class:`_SparseCall`)."""

    __slots__ = ("replay", "q_shape", "k_shape")

    @classmethod
    def record(cls, launch, q, k, cos, sin, qo, ko) -> _RotaryCall | None:
        replay = _triton_common.Replay.of(launch, (q, k, cos, sin, qo, ko))
        if replay is None or not (qo.is_contiguous() and ko.is_contiguous()):
            return None
        call = cls()
        call.replay, call.q_shape, call.k_shape = replay, qo.shape, ko.shape
        return call

    def __call__(self, q, k, cos, sin):
        qo = torch.empty(self.q_shape, dtype=q.dtype, device=q.device)
        ko = torch.empty(self.k_shape, dtype=k.dtype, device=k.device)
        self.replay((q, k, cos, sin, qo, ko))
        return qo, ko


def _rotary_shapes(q, k, cos, sin, rotary_len: int) -> str | None:
    """Why these are not [B, S, H, D] q and k with [1 or B, rotary_len, 1, D] tables (None: they are)."""
    if q.dim() != 4 or q.shape != k.shape:
        return f"q and k must be [B, S, H, D] of one shape, got {tuple(q.shape)} and {tuple(k.shape)}"
    batch, seq, _, d = q.shape
    if not 0 <= rotary_len <= seq:
        return f"rotary_len must lie in [0, S={seq}], got {rotary_len}"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 4 or t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (rotary_len, 1, d):
            want = f"[1 or B, {rotary_len}, 1, {d}] (rotated tokens, 1, D)"
            return f"{name} must be {want}, got {list(t.shape)}"
    return None


def _rotary_unsupported(q, k, cos, sin) -> str | None:
    """Why the Triton rotary kernel cannot take these (shape-checked) inputs (None: it can)."""
    d = q.shape[-1]
    if q.dtype not in _HALF or k.dtype != q.dtype:
        return f"q, k dtypes {q.dtype}, {k.dtype} (the kernel takes float16 or bfloat16)"
    if d % 2 or q.stride(-1) != 1 or k.stride(-1) != 1:
        return "head_dim must be even with unit stride"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype not in (q.dtype, torch.float32, torch.float64):
            return f"{name} must be float32, float64 or q's dtype, got {t.dtype}"
        if t.stride(-1) != 1 or t.device != q.device:
            return f"{name} must have unit stride on q's device"
    return None


_ROTARY_CONVENTIONS = ("wan", "apply_rotary_emb")


def rotary_interleaved(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backend: str = "auto",
    *,
    convention: str = "wan",
    rotary_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding on interleaved pairs of q and k, in one pass over each, bit-exact with the diffusers
    code it replaces on every backend.

    Conventions:
        "wan": diffusers' Wan processor (``reference.rotary_interleaved_reference``): ``out[2i] = x[2i]
            cos[2i] - x[2i+1] sin[2i+1]``, ``out[2i+1] = x[2i] sin[2i+1] + x[2i+1] cos[2i]``, in the promoted
            dtype of x and the tables, written in x's dtype.
        "apply_rotary_emb": ``diffusers.models.embeddings.apply_rotary_emb(use_real=True,
            use_real_unbind_dim=-1)``, as HunyuanVideo and Flux call it (``reference.
            rotary_pairs_reference``):
            ``out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i]``, ``out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]``
            in float32 (float64 with float64 tables), written in x's dtype.

    Args:
        q, k: [B, S, H, D], float16 or bfloat16 for the Triton kernel (any float dtype on "torch").
        cos, sin: [1 or B, rotary_len, 1, D] tables (float32, float64 or q's dtype).
        backend: "triton" (raises where it cannot run), "torch" (the reference), "auto" (Triton where it
            can run, else the reference; under torch.compile the reference, which the compiler fuses).
        convention: "wan" or "apply_rotary_emb" (above).
        rotary_len: rotate the first ``rotary_len`` tokens and return the rest unchanged (HunyuanVideo's text
            suffix); None: all S.

    Returns:
        the rotated (q, k), contiguous on the Triton backend.

    Raises:
        ValueError: an unknown backend or convention; q, k, cos, sin or rotary_len of the wrong shape.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if convention not in _ROTARY_CONVENTIONS:
        raise ValueError(f"convention must be one of {_ROTARY_CONVENTIONS}, got {convention!r}")
    key = _rotary_call_key(q, k, cos, sin, backend, convention, rotary_len)
    if key is not None:
        hit = _CALLS.get(key)
        if hit is not None:
            return hit(q, k, cos, sin)
    seq = q.shape[1] if q.dim() == 4 else -1
    rotary_len = seq if rotary_len is None else int(rotary_len)
    bad = _rotary_shapes(q, k, cos, sin, rotary_len)
    if bad is not None:
        raise ValueError(f"rotary_interleaved: {bad}")
    grad = _needs_grad(q, k)
    reason = None
    if backend != "torch":
        reason = _triton_unavailable_reason(q, grad=grad) or _rotary_unsupported(q, k, cos, sin)
        if backend == "triton" and reason is not None:
            raise RuntimeError(f"rotary_interleaved: backend='triton' cannot run: {reason}")
        if backend == "auto" and torch.compiler.is_compiling():
            reason = "compiling"
    if backend == "torch" or reason is not None:
        ref = reference.rotary_pairs_reference
        if convention == "wan":
            ref = reference.rotary_interleaved_reference

        def rotate(x):
            if rotary_len == seq:
                return ref(x, cos, sin)
            if rotary_len == 0:
                return x.clone()
            return torch.cat([ref(x[:, :rotary_len], cos, sin), x[:, rotary_len:]], dim=1)

        return rotate(q), rotate(k)
    with _recording(key) as launches:
        qo, ko = _run(_rotary_qk_impl, _rotary_qk_op, q, k, cos, sin, convention, rotary_len)
    _remember(key, launches, _RotaryCall.record, q, k, cos, sin, qo, ko)
    return qo, ko


_BLOCK_RESIDUALS = ("none", "add", "gated")
_BLOCK_NORMS = (None, "modulate", "affine")


def block_step(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    *,
    residual: str = "none",
    norm: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of a transformer block's per-token elementwise work in one pass: a residual, then a float32
    LayerNorm with modulation or affine, as ``WanTransformerBlock.forward`` computes them between its
    attention and feed-forward calls (``reference.block_step_reference`` is that eager arithmetic).

    Args:
        x: [B, S, D] hidden states (float16 or bfloat16 for the Triton kernel).
        y: [B, S, D] the branch output added by residual "add" or "gated".
        gate: [B, 1, D] float32, residual "gated": h = (x.float() + y * gate) in x's dtype.
        residual: "none" (h = x), "add" (h = x + y in x's dtype) or "gated".
        norm: None, "modulate" (n = LayerNorm(h) * (1 + scale) + shift; scale, shift [B, 1, D] float32) or
            "affine" (n = LayerNorm(h) * weight + bias; weight, bias [D]).
        eps: the LayerNorm's epsilon.
        backend: "triton" (raises where it cannot run), "torch" (the reference), "auto" (Triton where it can
            run, else the reference; under torch.compile the reference, which the compiler fuses).

    Returns:
        (h, n): h is x itself for residual "none"; n is None without a norm. The residual steps are bit-exact
        with the reference; n can differ from it in the last bit of x's dtype (the LayerNorm's sums run in
        another order than torch's).

    Raises:
        ValueError: an unknown backend, residual or norm; missing or misshaped operands.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if residual not in _BLOCK_RESIDUALS:
        raise ValueError(f"residual must be one of {_BLOCK_RESIDUALS}, got {residual!r}")
    if norm not in _BLOCK_NORMS:
        raise ValueError(f"norm must be one of {_BLOCK_NORMS}, got {norm!r}")
    bad = _block_step_shapes(x, y, gate, residual, norm, scale, shift, weight, bias)
    if bad is not None:
        raise ValueError(f"block_step: {bad}")
    kwargs = dict(residual=residual, norm=norm, scale=scale, shift=shift, weight=weight, bias=bias, eps=eps)
    reason = None
    if backend != "torch":
        grad = _needs_grad(*(t for t in (x, y, gate, scale, shift, weight, bias) if t is not None))
        reason = _triton_unavailable_reason(x, grad=grad)
        if reason is None and (x.stride(-1) != 1 or (y is not None and y.stride(-1) != 1)):
            reason = "x and y need a unit last stride"
        if backend == "triton" and reason is not None:
            raise RuntimeError(f"block_step: backend='triton' cannot run: {reason}")
        if backend == "auto" and torch.compiler.is_compiling():
            reason = "compiling"
    if backend == "torch" or reason is not None:
        return reference.block_step_reference(x, y, gate, **kwargs)
    from . import triton_block

    def f32(t):
        return None if t is None else t.float() if t.stride(-1) == 1 else t.float().contiguous()

    h, n = triton_block.block_step_fwd(
        x, y, f32(gate), residual, norm, f32(scale), f32(shift), weight, bias, eps, write_h=residual != "none"
    )
    return (x if h is None else h), n


def _block_step_shapes(x, y, gate, residual, norm, scale, shift, weight, bias) -> str | None:
    if x.dim() != 3:
        return f"x must be [B, S, D], got shape {tuple(x.shape)}"
    batch, _, d = x.shape
    if residual != "none" and (y is None or y.shape != x.shape or y.dtype != x.dtype):
        return f"residual {residual!r} needs y of x's shape and dtype {tuple(x.shape)} {x.dtype}"
    per_batch = {"gate": gate} if residual == "gated" else {}
    if norm == "modulate":
        per_batch.update(scale=scale, shift=shift)
    for name, t in per_batch.items():
        if t is None:
            return f"{name} is required (residual {residual!r}, norm {norm!r})"
        if t.dim() != 3 or t.shape[1] != 1 or t.shape[2] != d or t.shape[0] not in (1, batch):
            return f"{name} must be [B or 1, 1, {d}], got shape {tuple(t.shape)}"
    if norm == "affine":
        for name, t in (("weight", weight), ("bias", bias)):
            if t is None or t.shape != (d,):
                return f"norm 'affine' needs {name} of shape ({d},)"
    named = {"y": y, "gate": gate, "scale": scale, "shift": shift, "weight": weight, "bias": bias}
    for name, t in named.items():
        if t is not None and t.device != x.device:
            return f"{name} is on {t.device}, x on {x.device}"
    return None
