"""Block attention mass in Triton: W[b, h, p, c] = sum_{i in q-block p, j in k-block c} exp(s_ij - lse_i).

Provenance: the QK^T tile loop of a flash-attention forward with the P.V half removed. Given the LSE of a
dense pass over the same q and k, each row of W sums to the number of valid rows in the block, and W is
the exact attention mass per block. Given a stale LSE (from an earlier denoising step), it is the mass
under the old normaliser, which is what a cached pattern search needs.

Design: one program per (plan query block, batch*head) walks every key block and writes one scalar per
key block (deterministic, no atomics). When the kernel's query tile is smaller than the plan's query
block, the program loops over its query tiles, reloading them from L2 for each key block. Rows past the sequence and rows with lse = -inf read
lse = +inf, so their exp is 0 without a mask; key tiles that can hold invalid keys (sequence tail, keys
past ``kv_len``) are the last ones and alone pay for a mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    INTERPRET,
    LOG2E,
    LOG2E_C,
    cdiv,
    cfg,
    dot_f32,
    head_dim_pad,
    launch,
    load_tile,
    prune_configs,
    seq_bucket,
    tma_ok,
)


@triton.jit
def _mass_tile(
    q,
    lse2,
    k_base,
    stride_ks,
    start_n,
    offs_n,
    offs_d,
    seq_k,
    kv_limit,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    cols = start_n + offs_n  # [BLOCK_N]
    if USE_TMA:
        k = k_base.load([start_n, 0])  # [BLOCK_N, D_PAD]; zero-filled past the sequence and HEAD_DIM
    else:
        k = load_tile(k_base, cols, stride_ks, offs_d, seq_k, HEAD_DIM, MASKED, EVEN_D)  # [BLOCK_N, D_PAD]
    if DOT_F32:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(cols[None, :] < kv_limit, p, 0.0)
    return tl.sum(p, 1)  # per query row: the rows are summed once per chunk of key blocks


@triton.jit
def _query_tile(
    q_base,
    lse_base,
    row0,
    stride_qs,
    stride_ls,
    offs_d,
    seq_q,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    # q rows row0 .. row0 + BLOCK_M and their base-2 LSE; rows past the sequence or with lse = -inf get
    # +inf, so their exp is exactly 0.
    offs_m = row0 + tl.arange(0, BLOCK_M)
    q = load_tile(q_base, offs_m, stride_qs, offs_d, seq_q, HEAD_DIM, True, EVEN_D)  # [BLOCK_M, D_PAD]
    if DOT_F32:
        q = q.to(tl.float32)
    lse = tl.load(lse_base + offs_m * stride_ls, mask=offs_m < seq_q, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return q, lse * LOG2E_C


@triton.jit
def _mass_block(
    q,
    lse2,
    q_base,
    lse_base,
    row0,
    stride_qs,
    stride_ls,
    k_base,
    stride_ks,
    c,
    offs_n,
    offs_d,
    seq_q,
    seq_k,
    kv_limit,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    MASKED: tl.constexpr,
    PLAN_BK: tl.constexpr,
    SUBM: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Mass of plan block (row block of this program, key block c) per query row of the kernel's tile, summed
    # over the plan block's query and key tiles.
    w = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r in tl.static_range(SUBM):
        if SUBM > 1:
            # Several query tiles per plan block: reload each (from L2) rather than add across programs.
            q, lse2 = _query_tile(q_base, lse_base, row0 + r * BLOCK_M, stride_qs, stride_ls, offs_d, seq_q,
                                  HEAD_DIM, EVEN_D, DOT_F32, BLOCK_M)  # fmt: skip
        for s in tl.static_range(SUB):
            w += _mass_tile(q, lse2, k_base, stride_ks, c * PLAN_BK + s * BLOCK_N, offs_n, offs_d, seq_k, kv_limit,
                            qk_scale, HEAD_DIM, MASKED, EVEN_D, DOT_F32, USE_TMA)  # fmt: skip
    return w


# Key blocks whose row sums are reduced together (see the kernel's loop); `benchmarks/ab_block_mass.py`.
CHUNK = 16


# (BLOCK_M, BLOCK_N, warps, stages)
_TILES = ((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 4, 3), (128, 64, 8, 4))


def _configs():
    if INTERPRET:
        return [cfg(16, 16, 4, 1)]
    # Re-tune: `python benchmarks/bench_kernels.py` reports block_mass against one cuDNN attention;
    # `benchmarks/ab_block_mass.py` compares tile lists (its all_tiles: twelve). On an H200 128x128 / 8 warps /
    # 2 stages won at head_dim 128 (with the chunked row sums), 128x128 / 4 warps / 3 stages at 64.
    return [cfg(*c) for c in _TILES]


@triton.autotune(
    configs=_configs(),
    key=["HEAD_DIM_PAD", "SEQ_BUCKET", "PLAN_BQ", "PLAN_BK", "HAS_KV_LEN", "USE_TMA"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit
def _block_mass_kernel(
    Q,
    K,
    LSE,
    W,
    KV_LEN,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_lb,
    stride_lh,
    stride_ls,
    H,
    SEQ_Q,
    SEQ_K,
    N_QB,
    N_KB,
    qk_scale,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PLAN_BQ: tl.constexpr,
    PLAN_BK: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD
    SUB: tl.constexpr = PLAN_BK // BLOCK_N

    SUBM: tl.constexpr = PLAN_BQ // BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row0 = pid_m * PLAN_BQ
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    lse_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    if USE_TMA:
        k_base = tl.make_tensor_descriptor(k_base, [SEQ_K, HEAD_DIM], [stride_ks, 1], [BLOCK_N, HEAD_DIM_PAD])
    # With one query tile per plan block, q stays in registers for the whole key loop.
    q, lse2 = _query_tile(q_base, lse_base, row0, stride_qs, stride_ls, offs_d, SEQ_Q, HEAD_DIM, EVEN_D,
                          DOT_F32, BLOCK_M)  # fmt: skip

    kv_limit = SEQ_K
    if HAS_KV_LEN:
        kv_limit = tl.minimum(tl.load(KV_LEN + b).to(tl.int32), SEQ_K)

    w_base = W + pid_bh.to(tl.int64) * N_QB * N_KB + pid_m * N_KB
    n_full = kv_limit // PLAN_BK
    # Row sums of CHUNK key blocks are kept as the columns of R and summed over the rows (across warps: a
    # shared-memory round trip and a barrier) once per chunk, not once per key block, so the warps of a
    # program do not wait for each other at every key tile.
    offs_ch = tl.arange(0, CHUNK)
    for c0 in range(0, n_full, CHUNK):
        R = tl.zeros([BLOCK_M, CHUNK], dtype=tl.float32)
        for j in range(0, tl.minimum(n_full - c0, CHUNK)):
            r = _mass_block(q, lse2, q_base, lse_base, row0, stride_qs, stride_ls, k_base, stride_ks, c0 + j, offs_n,
                            offs_d, SEQ_Q, SEQ_K, kv_limit, qk_scale, HEAD_DIM, EVEN_D, DOT_F32, USE_TMA, False,
                            PLAN_BK, SUBM, SUB, BLOCK_M, BLOCK_N)  # fmt: skip
            R = tl.where(offs_ch[None, :] == j, r[:, None], R)
        tl.store(w_base + c0 + offs_ch, tl.sum(R, 0), mask=c0 + offs_ch < n_full)
    for c in range(n_full, N_KB):
        r = _mass_block(q, lse2, q_base, lse_base, row0, stride_qs, stride_ls, k_base, stride_ks, c, offs_n, offs_d,
                        SEQ_Q, SEQ_K, kv_limit, qk_scale, HEAD_DIM, EVEN_D, DOT_F32, USE_TMA, True, PLAN_BK,
                        SUBM, SUB, BLOCK_M, BLOCK_N)  # fmt: skip
        tl.store(w_base + c, tl.sum(r, 0))


def block_mass_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    block_q: int,
    block_k: int,
    scale: float,
    kv_len: torch.Tensor | None,
) -> torch.Tensor:
    """Launch on (B, H, S, D) views; lse fp32 [B, H, S_q] (any strides). Returns fp32 [B, H, n_qb, n_kb]."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    n_qb, n_kb = cdiv(seq_q, block_q), cdiv(seq_k, block_k)
    kv_len_arg = kv_len if kv_len is not None else lse
    w = torch.empty(batch, heads, n_qb, n_kb, dtype=torch.float32, device=q.device)
    grid = (n_qb, batch * heads)

    launch(
        _block_mass_kernel,
        grid,
        q,
        k,
        lse,
        w,
        kv_len_arg,
        *q.stride()[:3],
        *k.stride()[:3],
        *lse.stride()[:3],
        heads,
        seq_q,
        seq_k,
        n_qb,
        n_kb,
        scale * LOG2E,
        SEQ_BUCKET=seq_bucket(seq_q, seq_k),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad(head_dim),
        PLAN_BQ=block_q,
        PLAN_BK=block_k,
        HAS_KV_LEN=kv_len is not None,
        DOT_F32=dot_f32(q),
        USE_TMA=tma_ok(k),
        CHUNK=CHUNK,
    )
    return w
