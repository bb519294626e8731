"""Rotary embedding on interleaved pairs in Triton, for q and k in one launch (Wan's RoPE).

Provenance: the arithmetic of diffusers' ``WanAttnProcessor`` rotary step (``reference.
rotary_interleaved_reference``), which runs as about eight passes over q (two products and a difference per
half, in the promoted dtype, then strided writes). Here one program takes one token of q and of k: each head's
row is read and written once, contiguously, its pairs split in registers. Bit-exact with the reference, whatever dtype the tables come in:

- tables in x's dtype (a model cast with ``.to(bf16)`` casts its rotary buffers too): every product and
  the difference are rounded to that dtype, as each eager op rounds;
- fp32 tables: products and the difference in fp32, without fused multiply-adds (``enable_fp_fusion=False``),
  rounded once at the store;
- fp64 tables (diffusers' default buffers): in fp64, then to fp32 and to x's dtype, as torch's copy does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MODES = {torch.float32: 1, torch.float64: 2}


@triton.jit
def _rotate(x1, x2, c, s, MODE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    if MODE == 0:  # tables in x's dtype: each eager op rounds to it
        a = (x1.to(tl.float32) * c.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)
        b = (x2.to(tl.float32) * s.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)
        e = (x1.to(tl.float32) * s.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)
        f = (x2.to(tl.float32) * c.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)
        return (a - b).to(OUT_DTYPE), (e + f).to(OUT_DTYPE)
    elif MODE == 1:
        a = x1.to(tl.float32) * c
        b = x2.to(tl.float32) * s
        e = x1.to(tl.float32) * s
        f = x2.to(tl.float32) * c
        return (a - b).to(OUT_DTYPE), (e + f).to(OUT_DTYPE)
    else:
        a = x1.to(tl.float64) * c
        b = x2.to(tl.float64) * s
        e = x1.to(tl.float64) * s
        f = x2.to(tl.float64) * c
        return (a - b).to(tl.float32).to(OUT_DTYPE), (e + f).to(tl.float32).to(OUT_DTYPE)


@triton.jit
def _rotary_row(X, OUT, c, s, b, t, stride_b, stride_s, stride_h, o_b, o_s, o_h, H,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    dims = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]: a head's row, read and written contiguously
    base = X + b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_s
    out = OUT + b.to(tl.int64) * o_b + t.to(tl.int64) * o_s
    for h0 in range(0, H, BLOCK_H):
        mask = ((h0 + heads) < H) & (dims < D)
        x = tl.load(base + (h0 + heads) * stride_h + dims, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_D]
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_D // 2, 2)))  # [BLOCK_H, BLOCK_D / 2] each
        y1, y2 = _rotate(x1, x2, c, s, MODE, OUT.dtype.element_ty)
        y = tl.reshape(tl.join(y1, y2), (BLOCK_H, BLOCK_D))
        tl.store(out + (h0 + heads) * o_h + dims, y, mask=mask)


@triton.jit
def _rotary_qk_fwd_kernel(
    Q, K, QO, KO, COS, SIN,
    S, H,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h,
    oq_b, oq_s, oq_h, ok_b, ok_s, ok_h,
    sc_b, sc_s, ss_b, ss_s,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # b * S + t: one token of q and of k, every head
    b = row // S
    t = row % S
    dims = tl.arange(0, BLOCK_D)
    cos = tl.load(COS + b.to(tl.int64) * sc_b + t.to(tl.int64) * sc_s + dims, mask=dims < D, other=0.0)
    sin = tl.load(SIN + b.to(tl.int64) * ss_b + t.to(tl.int64) * ss_s + dims, mask=dims < D, other=0.0)
    c, _ = tl.split(tl.reshape(cos, (BLOCK_D // 2, 2)))  # cos[0::2]
    _, s = tl.split(tl.reshape(sin, (BLOCK_D // 2, 2)))  # sin[1::2]
    c = c[None, :]
    s = s[None, :]
    _rotary_row(Q, QO, c, s, b, t, sq_b, sq_s, sq_h, oq_b, oq_s, oq_h, H, BLOCK_H, BLOCK_D, D, MODE)
    _rotary_row(K, KO, c, s, b, t, sk_b, sk_s, sk_h, ok_b, ok_s, ok_h, H, BLOCK_H, BLOCK_D, D, MODE)


def rotary_qk_fwd(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k): q, k [B, S, H, D] with unit last stride; cos, sin [B or 1, S, 1, D] (expanded views
    allowed). The caller checks shapes and dtypes."""
    batch, seq, heads, d = q.shape
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    mode = 0 if cos.dtype == q.dtype else _MODES[cos.dtype]
    block_d = max(triton.next_power_of_2(d), 2)
    block_h = max(1, min(triton.next_power_of_2(heads), 4096 // block_d))
    _rotary_qk_fwd_kernel[(batch * seq,)](
        q, k, qo, ko, cos, sin,
        seq, heads,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
        D=d, BLOCK_H=block_h, BLOCK_D=block_d, MODE=mode,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return qo, ko
