"""Block-sparse flash attention forward in Triton, returning the per-row log-sum-exp, with an optional
softmax-statistics correction in the epilogue.

Provenance: the online-softmax loop follows FlashAttention-2 (Dao, 2023) as written in Triton's fused
attention tutorial (shared primitives in ``triton_common``). What changed: the key loop walks a
per-(batch, head, query block) list of key blocks (a BlockPlan) instead of a contiguous range; inputs are
taken by strides, so both diffusers' (B, S, H, D) layout and SDPA's (B, H, S, D) layout are read without
copies; any sequence length (tail rows and keys are masked); head_dim up to 256, padded to a power of two
inside the kernel by masked loads; an optional per-batch valid key length; rows that see no key produce 0 and
LSE = -inf.

Correction (re-ttention's sparse step): with ``HAS_CORR`` the epilogue returns
``min(rho + rho_add, 1) * O_sparse + R`` (no clamp without ``CLAMP``) where rho [B, H, S] fp32 and the
residual R (any float dtype, fp8 with a per-row fp32 scale) were cached at a refresh step. ``rho_add`` is a
launch argument or, with ``RHO_DEV``, read from a one-element fp32 tensor (a CUDA graph replays the kernel
with the value in that tensor at replay time, not the one at capture). The LSE written is the sparse one.

Statistics (re-ttention's two-pass refresh): with ``STATS`` the kernel is given a dense pass's output and LSE
over the same q, k, v (in O and LSE, read) and its epilogue writes the plan's statistics instead of its
output: rho = exp(LSE_in - LSE) and R = O - rho * O_in (fp8 with a per-row scale), as the refresh kernel's.

Caveats: a plan block must be a multiple of the kernel tile (BLOCK_M divides block_q, BLOCK_N divides
block_k); fp16 and bf16 only; head_dim that is not a power of two (72, 80, 96) pays for the padding in the
matrix units (two narrower products instead, 72 as 64 + 16 columns, were no faster on an H100 and were
removed: docs/kernels.md, "Split head dim").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    LN2,
    LOG2E,
    attention_configs,
    cdiv,
    dense_loop,
    dot_f32,
    head_dim_pad,
    launch,
    load_tile,
    plan_args,
    plan_loop,
    prune_configs,
    seq_bucket,
    store_residual,
    tma_ok,
)


@triton.jit
def _correct(
    out,
    offs_m,
    offs_d,
    seq_q,
    r_base,
    stride_rs,
    rho_base,
    scale_base,
    rho_add,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    R_SCALED: tl.constexpr,
    CLAMP: tl.constexpr,
):
    # [BLOCK_M, D_PAD]: rho~ * out + R for the rows offs_m.
    rho = tl.load(rho_base + offs_m, mask=offs_m < seq_q, other=1.0) + rho_add  # [BLOCK_M]
    if CLAMP:
        rho = tl.minimum(rho, 1.0)
    r = load_tile(r_base, offs_m, stride_rs, offs_d, seq_q, HEAD_DIM, True, EVEN_D).to(tl.float32)
    if R_SCALED:
        r = r * tl.load(scale_base + offs_m, mask=offs_m < seq_q, other=0.0)[:, None]
    return rho[:, None] * out + r


@triton.autotune(
    configs=attention_configs(),
    key=[
        "HEAD_DIM_PAD",
        "SEQ_BUCKET",
        "DENSE",
        "PLAN_BQ",
        "PLAN_BK",
        "HAS_KV_LEN",
        "USE_TMA",
        "HAS_CORR",
        "STATS",
    ],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit
def _block_sparse_attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    KV_IDX,
    KV_CNT,
    KV_LEN,
    RHO,
    R,
    R_SCALE,
    RHO_ADD,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    stride_ib,
    stride_ih,
    stride_im,
    stride_ik,
    stride_cb,
    stride_ch,
    stride_cm,
    stride_rb,
    stride_rh,
    stride_rs,
    H,
    SEQ_Q,
    SEQ_K,
    qk_scale,
    rho_add,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PLAN_BQ: tl.constexpr,
    PLAN_BK: tl.constexpr,
    MAX_K_LOG2: tl.constexpr,
    DENSE: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    HAS_CORR: tl.constexpr,
    R_SCALED: tl.constexpr,
    CLAMP: tl.constexpr,
    RHO_DEV: tl.constexpr,
    STATS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = load_tile(q_base, offs_m, stride_qs, offs_d, SEQ_Q, HEAD_DIM, True, EVEN_D)  # [BLOCK_M, D_PAD]
    if DOT_F32:
        q = q.to(tl.float32)
    if USE_TMA:
        k_base = tl.make_tensor_descriptor(k_base, [SEQ_K, HEAD_DIM], [stride_ks, 1], [BLOCK_N, HEAD_DIM_PAD])
        v_base = tl.make_tensor_descriptor(v_base, [SEQ_K, HEAD_DIM], [stride_vs, 1], [BLOCK_N, HEAD_DIM_PAD])

    kv_limit = SEQ_K
    if HAS_KV_LEN:
        kv_limit = tl.minimum(tl.load(KV_LEN + b).to(tl.int32), SEQ_K)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    if DENSE:
        acc, m_i, l_i = dense_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, SEQ_K,
                                   kv_limit, qk_scale, HEAD_DIM, EVEN_D, DOT_F32, USE_TMA, BLOCK_N)  # fmt: skip
    else:
        row = (pid_m * BLOCK_M) // PLAN_BQ
        idx_base = (
            KV_IDX + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + row.to(tl.int64) * stride_im
        )
        count = tl.load(KV_CNT + b * stride_cb + h * stride_ch + row * stride_cm)
        acc, m_i, l_i = plan_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, idx_base, stride_ik,
                                  count, offs_n, offs_d, SEQ_K, kv_limit, qk_scale, HEAD_DIM, EVEN_D, DOT_F32,
                                  USE_TMA, HAS_KV_LEN, PLAN_BK, MAX_K_LOG2, BLOCK_N)  # fmt: skip

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    if HAS_CORR:
        if RHO_DEV:
            rho_add = tl.load(RHO_ADD)
        r_base = R + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh
        row_base = pid_bh.to(tl.int64) * SEQ_Q
        out = _correct(out, offs_m, offs_d, SEQ_Q, r_base, stride_rs, RHO + row_base, R_SCALE + row_base,
                       rho_add, HEAD_DIM, EVEN_D, R_SCALED, CLAMP)  # fmt: skip
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    row_ptrs = pid_bh.to(tl.int64) * SEQ_Q + offs_m
    if STATS:
        # O and LSE hold the dense pass's output and LSE (inputs); out, lse are the plan's (in-mask) pass.
        lse_full = tl.load(LSE + row_ptrs, mask=offs_m < SEQ_Q, other=float("-inf"))
        no_key = lse_full == float("-inf")
        # Capped at 1 as the reference does: two passes' LSEs can put a full row's share a rounding above.
        rho = tl.where(no_key, 1.0, tl.minimum(tl.exp(lse - tl.where(no_key, 0.0, lse_full)), 1.0))
        o_full = load_tile(o_base, offs_m, stride_os, offs_d, SEQ_Q, HEAD_DIM, True, EVEN_D).to(tl.float32)
        tl.store(RHO + row_ptrs, rho, mask=offs_m < SEQ_Q)
        r_base = R + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh
        store_residual(o_full - rho[:, None] * out, r_base, stride_rs, R_SCALE + row_ptrs, offs_m, offs_d, SEQ_Q,
                       HEAD_DIM, R_SCALED)  # fmt: skip
    else:
        o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
        tl.store(
            o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
        )
        tl.store(LSE + row_ptrs, lse, mask=offs_m < SEQ_Q)


def sparse_attention_fwd(
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
    rho_add: float | torch.Tensor = 0.0,
    clamp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch on (B, H, S, D) views. ``kv_indices is None`` runs every key block (dense).

    kv_indices / kv_counts are [B or 1, H or 1, n_qb, max_k] / [B or 1, H or 1, n_qb] (broadcast by zero
    strides). With ``rho`` (fp32 [B, H, S_q], contiguous) and ``residual`` ((B, H, S_q, D) view, last dim
    contiguous; fp8 needs ``residual_scale`` fp32 [B, H, S_q]) the output is corrected (module docstring);
    ``rho_add`` a float or a one-element fp32 tensor on q's device, read by the kernel.
    Returns out (strides like q where q is dense, else contiguous (B, H, S, D)) and lse fp32 [B, H, S_q].
    """
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    _launch(q, k, v, out, lse, kv_indices, kv_counts, block_q, block_k, scale, kv_len, rho, residual,
            residual_scale, rho_add, clamp, stats=False)  # fmt: skip
    return out, lse


def mask_statistics_fwd(
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
    rho: torch.Tensor,
    residual: torch.Tensor,
    residual_scale: torch.Tensor | None,
) -> None:
    """The plan's pass over (B, H, S, D) views whose epilogue, given the dense pass's ``out`` ((B, H, S_q, D)
    view, last dim contiguous) and ``lse`` (fp32 [B, H, S_q], contiguous), writes re-ttention's statistics
    into ``rho`` (fp32 [B, H, S_q]), ``residual`` ((B, H, S_q, D) view, its storage dtype) and, for float8,
    ``residual_scale``: rho = exp(LSE_in - LSE), R = out - rho * O_in. Neither the plan's output nor its LSE
    is written."""
    _launch(q, k, v, out, lse, kv_indices, kv_counts, block_q, block_k, scale, kv_len, rho, residual,
            residual_scale, 0.0, True, stats=True)  # fmt: skip


def _launch(q, k, v, out, lse, kv_indices, kv_counts, block_q, block_k, scale, kv_len, rho, residual,
            residual_scale, rho_add, clamp, stats: bool) -> None:  # fmt: skip
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    dense = kv_indices is None
    idx, cnt, idx_strides, cnt_strides, max_k = plan_args(kv_indices, kv_counts, q.device)
    kv_len_arg = kv_len if kv_len is not None else lse  # any pointer; unused when HAS_KV_LEN is False
    has_corr = rho is not None and not stats
    r = residual if rho is not None else out  # unused without HAS_CORR or STATS
    rho_arg = rho if rho is not None else lse
    scale_arg = residual_scale if residual_scale is not None else lse
    rho_dev = isinstance(rho_add, torch.Tensor)
    rho_add_arg = rho_add if rho_dev else lse  # unused without RHO_DEV

    def grid(meta):
        return (cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    launch(
        _block_sparse_attn_fwd_kernel,
        grid,
        q,
        k,
        v,
        out,
        lse,
        idx,
        cnt,
        kv_len_arg,
        rho_arg,
        r,
        scale_arg,
        rho_add_arg,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *idx_strides,
        *cnt_strides,
        *r.stride()[:3],
        heads,
        seq_q,
        seq_k,
        scale * LOG2E,
        0.0 if rho_dev else float(rho_add),
        SEQ_BUCKET=seq_bucket(seq_q, seq_k),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad(head_dim),
        PLAN_BQ=block_q,
        PLAN_BK=block_k,
        MAX_K_LOG2=max(int(max_k).bit_length(), 1),
        DENSE=dense,
        HAS_KV_LEN=kv_len is not None,
        DOT_F32=dot_f32(q),
        USE_TMA=tma_ok(k, v),
        HAS_CORR=has_corr,
        R_SCALED=residual_scale is not None,
        CLAMP=bool(clamp),
        RHO_DEV=rho_dev and has_corr,
        STATS=stats,
    )
