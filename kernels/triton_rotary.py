"""Rotary embedding on interleaved pairs in Triton, for q and k in one launch.

Provenance: the arithmetic of two diffusers rotary steps, each of which runs as several elementwise passes over
q and k:
- ``"wan"``: ``WanAttnProcessor``'s (``reference.rotary_interleaved_reference``): two products and a
  difference per half in the promoted dtype, then strided writes; cos[0::2] and sin[1::2] serve both
  elements of a pair;
- ``"apply_rotary_emb"``: ``diffusers.models.embeddings.apply_rotary_emb`` with ``use_real=True,
  use_real_unbind_dim=-1`` (HunyuanVideo, Flux; ``reference.rotary_pairs_reference``): x and the rotated x
  upcast to float32, each element with its own cos and sin entry, summed, then cast back; the tables are
  upcast too (float64 tables compute in float64).
Here one program takes one token of q and of k: each head's row is read and written once, contiguously, its
pairs split in registers. Tokens from ``N_ROT`` on are copied unrotated (HunyuanVideo's text suffix, which the
stock processor concatenates after rotating the video tokens). Bit-exact with the references, whatever dtype
the tables come in (the list is the ``"wan"`` convention's; ``"apply_rotary_emb"`` computes in float32 for
half tables, as its upcasts do):

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

from .triton_common import launch_jit

_MODES = {torch.float32: 1, torch.float64: 2}


@triton.jit
def _rotate(x1, x2, c1, s1, c2, s2, MODE: tl.constexpr, OUT_DTYPE: tl.constexpr):
    # (x1 c1 - x2 s1, x1 s2 + x2 c2): the even output takes the pair's first table entries, the odd one the
    # second ("wan" passes the same c and s for both).
    if MODE == 0:  # tables in x's dtype: each eager op rounds to it
        a = (x1.to(tl.float32) * c1.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)
        b = (x2.to(tl.float32) * s1.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)
        e = (x1.to(tl.float32) * s2.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)
        f = (x2.to(tl.float32) * c2.to(tl.float32)).to(OUT_DTYPE).to(tl.float32)
        return (a - b).to(OUT_DTYPE), (e + f).to(OUT_DTYPE)
    elif MODE == 1:  # in float32 (half tables upcast exactly)
        a = x1.to(tl.float32) * c1.to(tl.float32)
        b = x2.to(tl.float32) * s1.to(tl.float32)
        e = x1.to(tl.float32) * s2.to(tl.float32)
        f = x2.to(tl.float32) * c2.to(tl.float32)
        return (a - b).to(OUT_DTYPE), (e + f).to(OUT_DTYPE)
    else:
        a = x1.to(tl.float64) * c1
        b = x2.to(tl.float64) * s1
        e = x1.to(tl.float64) * s2
        f = x2.to(tl.float64) * c2
        return (a - b).to(tl.float32).to(OUT_DTYPE), (e + f).to(tl.float32).to(OUT_DTYPE)


@triton.jit
def _rotary_row(X, OUT, c1, s1, c2, s2, rotate, b, t, stride_b, stride_s, stride_h, o_b, o_s, o_h, H,
                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    dims = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]: a head's row, read and written contiguously
    base = X + b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_s
    out = OUT + b.to(tl.int64) * o_b + t.to(tl.int64) * o_s
    for h0 in range(0, H, BLOCK_H):
        mask = ((h0 + heads) < H) & (dims < D)
        x = tl.load(base + (h0 + heads) * stride_h + dims, mask=mask, other=0.0)  # [BLOCK_H, BLOCK_D]
        if rotate:
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_D // 2, 2)))  # [BLOCK_H, BLOCK_D / 2] each
            y1, y2 = _rotate(x1, x2, c1, s1, c2, s2, MODE, OUT.dtype.element_ty)
            x = tl.reshape(tl.join(y1, y2), (BLOCK_H, BLOCK_D))
        tl.store(out + (h0 + heads) * o_h + dims, x, mask=mask)


@triton.jit
def _rotary_qk_fwd_kernel(
    Q, K, QO, KO, COS, SIN,
    S, H, N_ROT,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h,
    oq_b, oq_s, oq_h, ok_b, ok_s, ok_h,
    sc_b, sc_s, ss_b, ss_s,
    D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # b * S + t: one token of q and of k, every head
    b = row // S
    t = row % S
    rotate = t < N_ROT  # tokens past the rotated ones are copied
    dims = tl.arange(0, BLOCK_D)
    # One comparison, not (dims < D) & rotate: Triton 3.9's interpreter turns that & into an int32 mask.
    tab = dims < tl.where(rotate, D, 0)
    cos = tl.load(COS + b.to(tl.int64) * sc_b + t.to(tl.int64) * sc_s + dims, mask=tab, other=0.0)
    sin = tl.load(SIN + b.to(tl.int64) * ss_b + t.to(tl.int64) * ss_s + dims, mask=tab, other=0.0)
    c1, c2 = tl.split(tl.reshape(cos, (BLOCK_D // 2, 2)))  # cos[0::2], cos[1::2]
    s1, s2 = tl.split(tl.reshape(sin, (BLOCK_D // 2, 2)))
    if not PAIRS:  # "wan": cos[0::2] and sin[1::2] for both elements of a pair
        c2 = c1
        s1 = s2
    c1, s1, c2, s2 = c1[None, :], s1[None, :], c2[None, :], s2[None, :]
    _rotary_row(Q, QO, c1, s1, c2, s2, rotate, b, t, sq_b, sq_s, sq_h, oq_b, oq_s, oq_h, H,
                BLOCK_H, BLOCK_D, D, MODE)  # fmt: skip
    _rotary_row(K, KO, c1, s1, c2, s2, rotate, b, t, sk_b, sk_s, sk_h, ok_b, ok_s, ok_h, H,
                BLOCK_H, BLOCK_D, D, MODE)  # fmt: skip


def rotary_qk_fwd(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, convention: str, rotary_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k): q, k [B, S, H, D] with unit last stride; cos, sin [B or 1, rotary_len, 1, D] (expanded
    views allowed); tokens from rotary_len on are copied. The caller checks shapes and dtypes."""
    batch, seq, heads, d = q.shape
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    pairs = convention == "apply_rotary_emb"
    if pairs:  # x and its rotation upcast to float32 before the products
        mode = 2 if cos.dtype == torch.float64 else 1
    else:
        mode = 0 if cos.dtype == q.dtype else _MODES[cos.dtype]
    block_d = max(triton.next_power_of_2(d), 2)
    block_h = max(1, min(triton.next_power_of_2(heads), 4096 // block_d))
    launch_jit(
        _rotary_qk_fwd_kernel, (batch * seq,),
        q, k, qo, ko, cos, sin,
        seq, heads, rotary_len,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1),
        sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1),
        D=d, BLOCK_H=block_h, BLOCK_D=block_d, MODE=mode, PAIRS=pairs,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return qo, ko
