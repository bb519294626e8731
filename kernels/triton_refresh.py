"""Refresh attention in Triton: the dense output and, in the same pass over the keys, the softmax statistics
of a block plan's mask (re-ttention's refresh step).

For each query row i with the plan's key set S_i (in-mask) and the rest (out-of-mask):

    Z_in = sum_{j in S_i} exp(s_ij),  Z_out = sum_{j not in S_i} exp(s_ij),  Z = Z_in + Z_out
    O_full = (Z_in O_in + Z_out O_out) / Z,   rho = Z_in / Z,   R = O_full - rho O_in = Z_out O_out / Z

where O_in / O_out are the softmax outputs restricted to each set. The kernel walks every key tile exactly
once and keeps one accumulator at a time: first the out-of-mask tiles (a walk over all key blocks that skips
the row's sorted plan entries), whose normalised output is parked in the output buffer, then the in-mask
tiles (the sparse kernel's loop), then an epilogue that reloads the parked tile and writes O_full, the LSE of
the full row, rho and R. Keeping the in-mask part in registers means the parked (rounded) part is the smaller
one, weighted by 1 - rho.

R is written in its storage dtype; float8 (e4m3) gets a per-row scale max|R_i| / 448 so each row uses the
format's whole range. Rows with no valid key: O = 0, LSE = -inf, rho = 1, R = 0. Rows whose mask holds no
valid key: rho = 0, R = O_full.

Caveats: as the sparse kernel (tile sizes divide the plan's blocks; fp16 and bf16 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    LN2,
    LOG2E,
    attend_tile,
    attention_configs,
    cdiv,
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

# Plans whose key blocks are at most this many tokens walk the keys outside the plan without a branch
# (_complement_loop's MASKED_WALK): at small blocks the skip's branch keeps the key loads from being pipelined.
# Read at each uncached launch and part of the call cache's key (a change at run time makes new entries).
# docs/kernels.md#the-refresh-kernels-walk has the measurements.
MASKED_WALK_MAX_BLOCK = 64


@triton.jit
def _complement_loop(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_ks,
    stride_vs,
    idx_base,
    stride_ik,
    count,
    offs_n,
    offs_d,
    seq_k,
    kv_limit,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    PLAN_BK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED_WALK: tl.constexpr,
):
    # Every key block below kv_limit that is not in the row's sorted list (count entries at idx_base).
    # MASKED_WALK: no branch in the loop: a block of the list is walked too, with every key masked (a limit
    # of 0), so the key loads can be pipelined; the price is the list's blocks computed for nothing.
    SUB: tl.constexpr = PLAN_BK // BLOCK_N
    ptr = 0
    for kb in range(0, tl.cdiv(kv_limit, PLAN_BK)):
        nxt = tl.load(idx_base + tl.minimum(ptr, tl.maximum(count - 1, 0)) * stride_ik)
        in_mask = (ptr < count) & (nxt == kb)
        if MASKED_WALK:
            ptr += in_mask.to(tl.int32)
            limit = tl.where(in_mask, 0, kv_limit)
            for s in tl.static_range(SUB):
                acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs,
                                            kb * PLAN_BK + s * BLOCK_N, offs_n, offs_d, seq_k, limit, qk_scale,
                                            HEAD_DIM, True, EVEN_D, DOT_F32, USE_TMA)  # fmt: skip
        elif in_mask:
            ptr += 1
        else:
            for s in tl.static_range(SUB):
                start_n = kb * PLAN_BK + s * BLOCK_N
                if start_n + BLOCK_N <= kv_limit:
                    acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n,
                                                offs_n, offs_d, seq_k, kv_limit, qk_scale, HEAD_DIM, False, EVEN_D,
                                                DOT_F32, USE_TMA)  # fmt: skip
                elif start_n < kv_limit:
                    acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n,
                                                offs_n, offs_d, seq_k, kv_limit, qk_scale, HEAD_DIM, True, EVEN_D,
                                                DOT_F32, USE_TMA)  # fmt: skip
    return acc, m_i, l_i


@triton.autotune(
    configs=attention_configs(),
    key=["HEAD_DIM_PAD", "SEQ_BUCKET", "PLAN_BQ", "PLAN_BK", "HAS_KV_LEN", "USE_TMA", "R_FP8", "MASKED_WALK"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit
def _refresh_attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    RHO,
    R,
    R_SCALE,
    KV_IDX,
    KV_CNT,
    KV_LEN,
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
    stride_rb,
    stride_rh,
    stride_rs,
    stride_ib,
    stride_ih,
    stride_im,
    stride_ik,
    stride_cb,
    stride_ch,
    stride_cm,
    H,
    SEQ_Q,
    SEQ_K,
    qk_scale,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PLAN_BQ: tl.constexpr,
    PLAN_BK: tl.constexpr,
    MAX_K_LOG2: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    R_FP8: tl.constexpr,
    MASKED_WALK: tl.constexpr,
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

    row = (pid_m * BLOCK_M) // PLAN_BQ
    idx_base = KV_IDX + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + row.to(tl.int64) * stride_im
    count = tl.load(KV_CNT + b * stride_cb + h * stride_ch + row * stride_cm)

    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    o_mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)

    # Out-of-mask keys; the normalised output is parked in O.
    m_o = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_o = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    acc, m_o, l_o = _complement_loop(acc, m_o, l_o, q, k_base, v_base, stride_ks, stride_vs, idx_base, stride_ik,
                                     count, offs_n, offs_d, SEQ_K, kv_limit, qk_scale, HEAD_DIM, EVEN_D, DOT_F32,
                                     USE_TMA, PLAN_BK, BLOCK_N, MASKED_WALK)  # fmt: skip
    tl.store(o_ptrs, (acc / tl.where(l_o > 0.0, l_o, 1.0)[:, None]).to(O.dtype.element_ty), mask=o_mask)

    # In-mask keys.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    acc, m_i, l_i = plan_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, idx_base, stride_ik, count,
                              offs_n, offs_d, SEQ_K, kv_limit, qk_scale, HEAD_DIM, EVEN_D, DOT_F32, USE_TMA,
                              HAS_KV_LEN, PLAN_BK, MAX_K_LOG2, BLOCK_N)  # fmt: skip

    # Merge: weights of the two parts relative to the larger maximum (base 2).
    m = tl.maximum(m_i, m_o)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    a_in = l_i * tl.math.exp2(m_i - m_safe)
    a_out = l_o * tl.math.exp2(m_o - m_safe)
    z = a_in + a_out
    has_key = z > 0.0
    z_safe = tl.where(has_key, z, 1.0)
    w_in = tl.where(l_i > 0.0, a_in / (z_safe * tl.where(l_i > 0.0, l_i, 1.0)), 0.0)  # multiplies acc
    w_out = a_out / z_safe  # multiplies the parked O_out
    o_out = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    resid = w_out[:, None] * o_out
    out = w_in[:, None] * acc + resid
    rho = tl.where(has_key, a_in / z_safe, 1.0)
    lse = tl.where(has_key, (m_safe + tl.math.log2(z_safe)) * LN2, float("-inf"))
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)
    row_ptrs = pid_bh.to(tl.int64) * SEQ_Q + offs_m
    tl.store(LSE + row_ptrs, lse, mask=offs_m < SEQ_Q)
    tl.store(RHO + row_ptrs, rho, mask=offs_m < SEQ_Q)
    r_base = R + b.to(tl.int64) * stride_rb + h.to(tl.int64) * stride_rh
    store_residual(resid, r_base, stride_rs, R_SCALE + row_ptrs, offs_m, offs_d, SEQ_Q, HEAD_DIM, R_FP8)


def refresh_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    kv_len: torch.Tensor | None,
    residual: torch.Tensor,
    residual_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch on (B, H, S, D) views; fills ``residual`` ((B, H, S_q, D) view, its storage dtype) and, for
    float8, ``residual_scale`` (fp32 [B, H, S_q]). Returns out (like q), lse and rho (fp32 [B, H, S_q])."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    rho = torch.empty_like(lse)
    idx, cnt, idx_strides, cnt_strides, max_k = plan_args(kv_indices, kv_counts, q.device)
    kv_len_arg = kv_len if kv_len is not None else lse
    r_fp8 = residual.dtype == torch.float8_e4m3fn
    scale_arg = residual_scale if r_fp8 else lse

    def grid(meta):
        return (cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    launch(
        _refresh_attn_fwd_kernel,
        grid,
        q,
        k,
        v,
        out,
        lse,
        rho,
        residual,
        scale_arg,
        idx,
        cnt,
        kv_len_arg,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *residual.stride()[:3],
        *idx_strides,
        *cnt_strides,
        heads,
        seq_q,
        seq_k,
        scale * LOG2E,
        SEQ_BUCKET=seq_bucket(seq_q, seq_k),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad(head_dim),
        PLAN_BQ=block_q,
        PLAN_BK=block_k,
        MAX_K_LOG2=max(int(max_k).bit_length(), 1),
        HAS_KV_LEN=kv_len is not None,
        DOT_F32=dot_f32(q),
        USE_TMA=tma_ok(k, v),
        R_FP8=r_fp8,
        MASKED_WALK=block_k <= MASKED_WALK_MAX_BLOCK,
    )
    return out, lse, rho
