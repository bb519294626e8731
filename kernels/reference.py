"""Pure-torch references of every kernel in this package.

These are the oracles for the Triton kernels and the CPU execution path. They compute in fp32 and work on
the (B, H, S, D) view of the inputs. Memory is bounded by processing query rows in chunks: a chunk holds
at most ``_CHUNK_ELEMENTS`` scores. Nothing here imports Triton.
"""

from __future__ import annotations

import math

import torch

from .plan import BlockPlan, num_blocks

_CHUNK_ELEMENTS = 1 << 25
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _row_chunk(batch: int, heads: int, k_len: int, align: int) -> int:
    rows = max(_CHUNK_ELEMENTS // max(batch * heads * k_len, 1), 1)
    return max(rows // align, 1) * align


def _key_valid(k_len: int, kv_len: torch.Tensor | None, device) -> torch.Tensor:
    """Boolean [B or 1, 1, 1, k_len]: keys that exist and lie before the per-batch valid length."""
    cols = torch.arange(k_len, device=device)
    if kv_len is None:
        return torch.ones(1, 1, 1, k_len, dtype=torch.bool, device=device)
    return (cols[None, :] < kv_len.to(device).long()[:, None])[:, None, None, :]


def _chunk_mask(block_mask, plan: BlockPlan | None, r0: int, r1: int, k_len: int) -> torch.Tensor | None:
    """Element mask [B or 1, H or 1, r1 - r0, k_len] of query rows r0:r1 (None: no plan)."""
    if plan is None:
        return None
    rows = torch.arange(r0, r1, device=block_mask.device) // plan.block_q
    cols = torch.arange(k_len, device=block_mask.device) // plan.block_k
    return block_mask[:, :, rows][:, :, :, cols]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan | None,
    scale: float,
    kv_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in fp32.

    Args:
        q, k, v: [B, H, S_q | S_k, D] (any strides).
        plan: block plan (None: every key).
        scale: softmax scale.
        kv_len: optional int [B]; keys at or past it are ignored.

    Returns:
        out [B, H, S_q, D] in q's dtype; lse fp32 [B, H, S_q] (-inf for a row with no key, whose output is 0).
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    kf, vf = k.float(), v.float()
    key_ok = _key_valid(k_len, kv_len, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    block_mask = plan.to(q.device).to_block_mask() if plan is not None else None
    step = _row_chunk(batch, heads, k_len, plan.block_q if plan is not None else 1)
    for r0 in range(0, q_len, step):
        r1 = min(r0 + step, q_len)
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
        keep = key_ok
        m = _chunk_mask(block_mask, plan, r0, r1, k_len)
        if m is not None:
            keep = keep & m
        s = s.masked_fill(~keep, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse).unsqueeze(-1))
        out[:, :, r0:r1] = torch.matmul(p, vf).to(q.dtype)
        lse[:, :, r0:r1] = row_lse
    return out, lse


def block_mass_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    kv_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """W[b, h, p, c] = sum over rows i in query block p and keys j in key block c of exp(s_ij - lse_i).

    Rows whose lse is -inf contribute nothing; keys at or past ``kv_len`` contribute nothing.

    Args:
        q, k: [B, H, S_q | S_k, D] (any strides).
        lse: fp32 [B, H, S_q].

    Returns:
        fp32 [B, H, ceil(S_q / block_q), ceil(S_k / block_k)].
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[2]
    n_qb, n_kb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    kf = k.float()
    key_ok = _key_valid(k_len, kv_len, q.device)
    w = torch.zeros(batch, heads, n_qb, n_kb, dtype=torch.float32, device=q.device)
    step = _row_chunk(batch, heads, k_len, block_q)
    for r0 in range(0, q_len, step):
        r1 = min(r0 + step, q_len)
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
        row_lse = lse[:, :, r0:r1].float()
        finite = torch.isfinite(row_lse).unsqueeze(-1)
        p = torch.exp(s - torch.where(finite, row_lse.unsqueeze(-1), 0.0))
        p = torch.where(finite & key_ok, p, 0.0)
        p = torch.nn.functional.pad(p, (0, n_kb * block_k - k_len))
        per_col = p.view(batch, heads, r1 - r0, n_kb, block_k).sum(-1)
        rows = (r1 - r0) if (r1 - r0) % block_q == 0 else math.ceil((r1 - r0) / block_q) * block_q
        per_col = torch.nn.functional.pad(per_col, (0, 0, 0, rows - (r1 - r0)))
        w[:, :, r0 // block_q : r0 // block_q + rows // block_q] = per_col.view(
            batch, heads, rows // block_q, block_q, n_kb
        ).sum(3)
    return w


def _lse_finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), 0.0, lse)


def quantize_residual(r: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``r`` (fp32) in storage dtype ``dtype``; float8 (e4m3) gets a per-row scale max|r| / 448 over the
    last dim (1 for an all-zero row). Returns (stored, scale or None)."""
    if dtype != torch.float8_e4m3fn:
        return r.to(dtype), None
    amax = r.abs().amax(-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (r / scale.unsqueeze(-1)).to(dtype), scale.float()


def dequantize_residual(r: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 residual from its stored form."""
    out = r.float()
    return out * scale.unsqueeze(-1) if scale is not None else out


def refresh_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    scale: float,
    kv_len: torch.Tensor | None = None,
    residual_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dense attention plus the softmax statistics of ``plan``'s mask, in fp32.

    Args:
        q, k, v: [B, H, S_q | S_k, D] (any strides).
        plan: the block plan whose mask splits each row's keys into in-mask and out-of-mask.
        residual_dtype: storage dtype of R (default q's dtype); float8_e4m3fn gets a per-row scale.

    Returns:
        out [B, H, S_q, D] in q's dtype (the dense output); lse fp32 [B, H, S_q] (dense);
        rho fp32 [B, H, S_q] = exp(lse_in - lse) (1 for a row with no key, 0 when its mask holds none);
        R [B, H, S_q, D] = out - rho * out_in in ``residual_dtype``; the fp32 per-row scale of R or None.
    """
    qf, kf, vf = q.float(), k.float(), v.float()
    out, lse = attention_reference(qf, kf, vf, None, scale, kv_len)
    out_in, lse_in = attention_reference(qf, kf, vf, plan, scale, kv_len)
    rho, stored, r_scale = refresh_statistics(out, lse, out_in, lse_in, residual_dtype or q.dtype)
    return out.to(q.dtype), lse, rho, stored, r_scale


def refresh_statistics(out, lse, out_in, lse_in, residual_dtype: torch.dtype):
    """(rho, R in ``residual_dtype``, R's fp8 scale or None) from the fp32 dense pass (out, lse) and in-mask
    pass (out_in, lse_in) of :func:`refresh_reference`. rho is capped at 1: the in-mask share of the mass
    cannot exceed the whole, and two passes' LSEs can put it a rounding above (R absorbs the difference)."""
    rho = torch.where(torch.isinf(lse), 1.0, torch.exp(lse_in - _lse_finite(lse)).clamp(max=1.0))
    rho = torch.where(torch.isinf(lse_in) & ~torch.isinf(lse), 0.0, rho)
    resid = out - rho.unsqueeze(-1) * out_in
    stored, r_scale = quantize_residual(resid, residual_dtype)
    return rho, stored, r_scale


def corrected_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    scale: float,
    rho: torch.Tensor,
    residual: torch.Tensor,
    residual_scale: torch.Tensor | None = None,
    kv_len: torch.Tensor | None = None,
    rho_offset: float | torch.Tensor = 0.0,
    clamp_rho: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention corrected with cached statistics: ``min(rho + rho_offset, 1) * O_sparse + R``.

    Args:
        q, k, v, plan, scale, kv_len: as :func:`attention_reference`.
        rho: fp32 [B, H, S_q]; residual: [B, H, S_q, D] (any float dtype); residual_scale: fp32 [B, H, S_q]
            for a float8 residual, else None.
        rho_offset: added to rho (re-ttention's ramp), a number or a one-element tensor; clamp_rho: cap the
            sum at 1.

    Returns:
        out [B, H, S_q, D] in q's dtype; the sparse lse fp32 [B, H, S_q] (uncorrected).
    """
    out, lse = attention_reference(q.float(), k.float(), v.float(), plan, scale, kv_len)
    out = apply_correction(out, rho, residual, residual_scale, rho_offset, clamp_rho)
    return out.to(q.dtype), lse


def apply_correction(out, rho, residual, residual_scale, rho_offset, clamp_rho: bool) -> torch.Tensor:
    """``min(rho + rho_offset, 1) * out + R`` (no cap without ``clamp_rho``) in fp32, for the fp32 sparse
    output ``out`` of :func:`corrected_reference`."""
    r = rho.float() + rho_offset
    if clamp_rho:
        r = r.clamp(max=1.0)
    return r.unsqueeze(-1) * out + dequantize_residual(residual, residual_scale)


def rotary_interleaved_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs (x[2i], x[2i+1]), as diffusers' Wan processor applies it:
    ``out[2i] = x[2i] cos[2i] - x[2i+1] sin[2i+1]``, ``out[2i+1] = x[2i] sin[2i+1] + x[2i+1] cos[2i]``, in
    the promoted dtype of x and the tables, written in x's dtype. x [B, S, H, D]; cos, sin broadcast to it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c = cos[..., 0::2]
    s = sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def rotary_pairs_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs as ``diffusers.models.embeddings.apply_rotary_emb`` applies it
    with ``use_real=True, use_real_unbind_dim=-1`` (HunyuanVideo, Flux): ``out[2i] = x[2i] cos[2i] - x[2i+1]
    sin[2i]``, ``out[2i+1] = x[2i+1] cos[2i+1] + x[2i] sin[2i+1]``, with x upcast to float32 (and promoted
    with the tables), written in x's dtype. x [B, S, H, D]; cos, sin broadcast to it."""
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def block_step_reference(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of a transformer block's elementwise work, as ``WanTransformerBlock.forward`` runs it
    eagerly: h = x, ``x + y`` (residual "add") or ``(x.float() + y * gate).type_as(x)`` ("gated"); then
    n = ``(LayerNorm(h.float()) * (1 + scale) + shift).type_as(h)`` ("modulate", diffusers' FP32LayerNorm
    without affine) or ``LayerNorm(h.float(), weight.float(), bias.float()).type_as(h)`` ("affine"), or
    None. Returns (h, n)."""
    if residual == "none":
        h = x
    elif residual == "add":
        h = x + y
    else:
        h = (x.float() + y * gate).type_as(x)
    if norm is None:
        return h, None
    d = h.shape[-1]
    if norm == "modulate":
        n = torch.nn.functional.layer_norm(h.float(), (d,), None, None, eps)
        return h, (n * (1 + scale) + shift).type_as(h)
    n = torch.nn.functional.layer_norm(h.float(), (d,), weight.float(), bias.float(), eps)
    return h, n.type_as(h)
