"""A transformer block's per-token elementwise work in one pass per step: residual, LayerNorm, modulation.

Provenance: the arithmetic of ``diffusers.models.transformers.transformer_wan.WanTransformerBlock.forward``
around its attention and feed-forward calls, which runs each step as several elementwise passes over the
(B, S, D) hidden states (upcasts to float32, a float32 LayerNorm, products and sums with the modulation,
casts back), e.g. ``(norm1(x.float()) * (1 + scale) + shift).type_as(x)`` and
``(x.float() + y * gate).type_as(x)``. Here one program takes one token's row of D channels and does a whole
step, reading its inputs and writing its outputs once (``reference.block_step_reference`` is the eager
arithmetic):

- residual ``"none"``: h = x; ``"add"``: h = x + y rounded to x's dtype (a half-precision add);
  ``"gated"``: h = x + y * gate in float32 (gate float32, per batch), rounded once;
- norm ``"modulate"``: n = LayerNorm(h) * (1 + scale) + shift (no affine, float32 scale and shift per
  batch); ``"affine"``: n = LayerNorm(h) * weight + bias; the LayerNorm reads h as rounded, in float32.

Products and sums are separate roundings (no fused multiply-adds), as eager runs them. The residual steps are
bit-exact with eager; the LayerNorm's mean and variance are summed in another order than torch's kernel, so
its output can differ from eager's in the last bit of the half-precision result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import launch_jit

RESIDUALS = {"none": 0, "add": 1, "gated": 2}
NORMS = {None: 0, "modulate": 1, "affine": 2}


@triton.jit
def _block_step_kernel(
    X, Y, GATE, H_OUT, N_OUT, SCALE, SHIFT, W, B,
    S, D, eps,
    sx_b, sx_s, sy_b, sy_s, sh_b, sh_s, sn_b, sn_s, sg_b, ssc_b, ssh_b,
    RESIDUAL: tl.constexpr, WRITE_H: tl.constexpr, NORM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # b * S + t
    b = (row // S).to(tl.int64)
    t = (row % S).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + b * sx_b + t * sx_s + cols, mask=mask, other=0.0)
    if RESIDUAL == 0:
        h = x
    elif RESIDUAL == 1:  # x + y in the half dtype: float sum, one rounding
        y = tl.load(Y + b * sy_b + t * sy_s + cols, mask=mask, other=0.0)
        h = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
    else:  # (x.float() + y * gate).type_as(x)
        y = tl.load(Y + b * sy_b + t * sy_s + cols, mask=mask, other=0.0)
        g = tl.load(GATE + b * sg_b + cols, mask=mask, other=0.0)
        h = (x.to(tl.float32) + y.to(tl.float32) * g).to(x.dtype)
    if WRITE_H:
        tl.store(H_OUT + b * sh_b + t * sh_s + cols, h, mask=mask)
    if NORM != 0:
        hf = h.to(tl.float32)
        mean = tl.sum(hf, axis=0) / D
        diff = tl.where(mask, hf - mean, 0.0)
        var = tl.sum(diff * diff, axis=0) / D
        n = diff * (1.0 / tl.sqrt(var + eps))
        if NORM == 1:
            scale = tl.load(SCALE + b * ssc_b + cols, mask=mask, other=0.0)
            shift = tl.load(SHIFT + b * ssh_b + cols, mask=mask, other=0.0)
            n = n * (1.0 + scale) + shift
        else:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            bias = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            n = n * w + bias
        tl.store(N_OUT + b * sn_b + t * sn_s + cols, n.to(x.dtype), mask=mask)


def block_step_fwd(
    x: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    residual: str,
    norm: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    write_h: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(h, n) for x, y [B, S, D] (unit last stride); gate, scale, shift [B, 1, D] float32 (unit last stride,
    batch stride 0 allowed); weight, bias [D]. The caller checks shapes and dtypes."""
    batch, seq, d = x.shape
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if write_h else None
    n = torch.empty_like(x, memory_format=torch.contiguous_format) if norm is not None else None
    yy = y if y is not None else x
    hh = h if h is not None else x
    nn = n if n is not None else x
    g = gate if gate is not None else x
    sc = scale if scale is not None else x
    sh = shift if shift is not None else x

    def bstride(v: torch.Tensor) -> int:
        return v.stride(0) if v.shape[0] > 1 else 0

    block_d = triton.next_power_of_2(d)
    launch_jit(
        _block_step_kernel, (batch * seq,),
        x, yy, g, hh, nn, sc, sh, weight if weight is not None else x, bias if bias is not None else x,
        seq, d, float(eps),
        x.stride(0), x.stride(1), yy.stride(0), yy.stride(1), hh.stride(0), hh.stride(1),
        nn.stride(0), nn.stride(1), bstride(g), bstride(sc), bstride(sh),
        RESIDUAL=RESIDUALS[residual], WRITE_H=write_h, NORM=NORMS[norm], BLOCK_D=block_d,
        num_warps=max(1, min(16, block_d // 512)), enable_fp_fusion=False,
    )  # fmt: skip
    return h, n
