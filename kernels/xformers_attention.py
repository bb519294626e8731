"""Dense attention through xformers' ``fmha`` (an optional dependency), with the per-row log-sum-exp.

This module is the only one that imports xformers, lazily, on the first call that asks for it. It mirrors
xformers 0.0.35: the public ``memory_efficient_attention_forward`` (no LSE) and
``memory_efficient_attention_forward_requires_grad`` (output and LSE, no autograd graph), each given the
operator explicitly. The operator is chosen the way fmha's dispatcher chooses it (its private
``dispatch._dispatch_fw_priority_list`` and each operator's ``not_supported_reasons``), so the one that
runs can be named, and a call none supports gets xformers' own reasons.

What fmha 0.0.35 runs on CUDA: the first operator that supports the inputs among FlashAttention-3
(``fa3F``; only where the separate ``flash_attn_3`` package is installed), FlashAttention-2 (``fa2F``: the
``flash_attn`` package, or PyTorch's own flash kernel, ``fa2F@<version>-pt``) and PyTorch's
memory-efficient kernel (``cutlassF-pt``). With the xformers wheel alone, a Hopper GPU therefore runs
PyTorch's FlashAttention-2 kernel. Every operator is also gated on xformers' compiled extension having
loaded (the 0.0.35 wheel's ``_C.so`` links ``libcudart.so.12``); where it did not, no call is supported
and the reason says why.

Layout: fmha takes (B, S, H, D), diffusers' layout; both of our layouts are passed as strided views (no
copies). The output comes back contiguous (B, S, H, D) and is returned as a (B, H, S, D) view. The LSE
comes back fp32 [B, H, S_q], natural log (the memory-efficient kernel pads its rows to a multiple of 32;
cut here). A per-batch valid key length (``kv_len``) is not supported: fmha expresses it only as a
``BlockDiagonalPaddedKeysMask``, which packs the batch into one variable-length sequence and takes the
lengths on the host (a device synchronisation per call).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["fw_op_name", "unavailable_reason", "version", "xformers_attention"]

_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _fmha() -> tuple[Any, str | None]:
    """(xformers.ops.fmha, None), or (None, why it cannot be imported)."""
    try:
        from xformers.ops import fmha
    except Exception as exc:  # ImportError, or an xformers build that fails on import
        return None, f"xformers could not be imported ({type(exc).__name__}: {exc})"
    return fmha, None


def version() -> str | None:
    """xformers' version, or None where it cannot be imported."""
    fmha, _ = _fmha()
    if fmha is None:
        return None
    import xformers

    return xformers.__version__


def _extension_error() -> str | None:
    """Why xformers' compiled extension did not load (its operators all refuse CUDA then), or None."""
    try:
        from xformers import _cpp_lib
    except Exception:  # noqa: BLE001 - a layout change in xformers; the dispatcher still gives reasons
        return None
    exc = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    if exc is None:
        return None
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    first = str(exc).strip().splitlines()[0]
    return first if root is exc else f"{first} ({root})"


def _bshd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _dispatch(qh, kh, vh, scale: float, needs_lse: bool):
    """(operator, {}) that fmha runs for these (B, H, S, D) views, or (None, {operator: [reasons]})."""
    from xformers.ops.fmha.common import Inputs
    from xformers.ops.fmha.dispatch import _dispatch_fw_priority_list

    inp = Inputs(query=_bshd(qh), key=_bshd(kh), value=_bshd(vh), attn_bias=None, p=0.0, scale=scale)
    tried: dict[str, list[str]] = {}
    for op in _dispatch_fw_priority_list(inp, needs_lse):  # as fmha.dispatch._dispatch_fw walks it
        reasons = op.not_supported_reasons(inp)
        if not reasons:
            return op, {}
        tried[op.NAME] = reasons
    return None, tried


def unavailable_reason(qh, kh, vh, kv_len, scale: float, needs_lse: bool) -> str | None:
    """Why xformers cannot run this dense call ((B, H, S, D) views), or None when it can."""
    fmha, error = _fmha()
    if fmha is None:
        return error
    if not qh.is_cuda:
        return f"tensors are on {qh.device}; xformers' attention kernels need CUDA"
    if qh.dtype not in _HALF:
        return f"dtype {qh.dtype} (the xformers path takes float16 and bfloat16)"
    if kv_len is not None:
        return (
            "kv_len: xformers expresses it only by packing the batch into one variable-length sequence "
            "with the lengths read on the host"
        )
    op, tried = _dispatch(qh, kh, vh, scale, needs_lse)
    if op is not None:
        return None
    detail = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in tried.items())
    ext = _extension_error()
    msg = f"no xformers operator supports the call ({detail})"
    return f"{msg}; xformers' extension did not load: {ext}" if ext else msg


def fw_op_name(qh, kh, vh, scale: float, needs_lse: bool) -> str | None:
    """Name of the fmha operator that runs this call (e.g. ``fa2F@2.7.4-pt``), or None if none can."""
    if _fmha()[0] is None:
        return None
    op, _ = _dispatch(qh, kh, vh, scale, needs_lse)
    return op.NAME if op is not None else None


def xformers_attention(
    qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, scale: float, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense attention on (B, H, S, D) views: out (B, H, S_q, D) view, lse fp32 [B, H, S_q] or None.

    The caller has checked :func:`unavailable_reason`. A call with no keys returns out 0 and lse -inf.
    """
    fmha, error = _fmha()
    if fmha is None:
        raise RuntimeError(error)
    batch, heads, q_len, _ = qh.shape
    if kh.shape[2] == 0:
        out = qh.new_zeros(qh.shape[:3] + (vh.shape[3],))
        lse = torch.full((batch, heads, q_len), float("-inf"), dtype=torch.float32, device=qh.device)
        return out, (lse if return_lse else None)
    op, tried = _dispatch(qh, kh, vh, scale, return_lse)
    if op is None:
        raise RuntimeError(f"no xformers operator supports the call: {tried}")
    q, k, v = _bshd(qh), _bshd(kh), _bshd(vh)
    if not return_lse:
        out = fmha.memory_efficient_attention_forward(q, k, v, attn_bias=None, p=0.0, scale=scale, op=op)
        return _bshd(out), None
    out, lse = fmha.memory_efficient_attention_forward_requires_grad(
        q, k, v, attn_bias=None, p=0.0, scale=scale, op=op
    )
    return _bshd(out), lse[:, :, :q_len].float().contiguous()
