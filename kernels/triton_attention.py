"""Block-sparse flash attention forward in Triton, returning the per-row log-sum-exp.

Provenance: the online-softmax loop follows FlashAttention-2 (Dao, 2023) as written in Triton's fused
attention tutorial. What changed: the key loop walks a per-(batch, head, query block) list of key blocks
(a BlockPlan) instead of a contiguous range; inputs are taken by strides, so both diffusers' (B, S, H, D)
layout and SDPA's (B, H, S, D) layout are read without copies; any sequence length (tail rows and keys are
masked); head_dim up to 256, padded to a power of two inside the kernel by masked loads; an optional
per-batch valid key length; rows that see no key produce 0 and LSE = -inf.

Caveats: a plan block must be a multiple of the kernel tile (BLOCK_M divides block_q, BLOCK_N divides
block_k); fp16 and bf16 only; head_dim that is not a power of two (72, 80, 96) pays for the padding in the
matrix units.

Masking cost is paid only where needed: key blocks are sorted, so every block that can hold a masked key
(the sequence tail, or keys past ``kv_len``) is at the end of a row's list. A binary search finds where
that suffix starts; the prefix runs without any mask, the suffix with it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _load_tile(
    base,
    offs_r,
    stride_r,
    offs_d,
    n_rows,
    HEAD_DIM: tl.constexpr,
    ROW_MASK: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    # [R, HEAD_DIM_PAD] tile of rows offs_r; rows >= n_rows and columns >= HEAD_DIM read as 0.
    ptrs = base + offs_r[:, None].to(tl.int64) * stride_r + offs_d[None, :]
    if ROW_MASK:
        if EVEN_D:
            return tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_ks,
    stride_vs,
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
    # One [BLOCK_M, BLOCK_N] step of the online softmax (base 2: scores are pre-multiplied by log2 e).
    # With USE_TMA, k_base / v_base are tensor descriptors: the copy engine zero-fills rows past the
    # sequence and columns past HEAD_DIM, so no load needs a mask.
    cols = start_n + offs_n  # [BLOCK_N]
    if USE_TMA:
        k = k_base.load([start_n, 0])  # [BLOCK_N, D_PAD]
    else:
        k = _load_tile(k_base, cols, stride_ks, offs_d, seq_k, HEAD_DIM, MASKED, EVEN_D)  # [BLOCK_N, D_PAD]
    if DOT_F32:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
    if MASKED:
        qk = tl.where(cols[None, :] < kv_limit, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # A row with no valid key so far keeps m = -inf; subtract 0 instead so nothing becomes NaN.
        m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = m_ij
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_TMA:
        v = v_base.load([start_n, 0])  # [BLOCK_N, D_PAD]
    else:
        v = _load_tile(v_base, cols, stride_vs, offs_d, seq_k, HEAD_DIM, MASKED, EVEN_D)  # [BLOCK_N, D_PAD]
    if DOT_F32:
        # P is rounded to the input dtype first, exactly as the compiled kernel does.
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_ij, l_i


@triton.jit
def _dense_loop(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_ks,
    stride_vs,
    offs_n,
    offs_d,
    seq_k,
    kv_limit,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Every key tile below kv_limit: full tiles unmasked, then the partial one masked.
    n_full = kv_limit // BLOCK_N
    for t in range(0, n_full):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, t * BLOCK_N, offs_n,
                                     offs_d, seq_k, kv_limit, qk_scale, HEAD_DIM, False, EVEN_D, DOT_F32,
                                     USE_TMA)  # fmt: skip
    if n_full * BLOCK_N < kv_limit:
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, n_full * BLOCK_N,
                                     offs_n, offs_d, seq_k, kv_limit, qk_scale, HEAD_DIM, True, EVEN_D, DOT_F32,
                                     USE_TMA)  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _first_masked_entry(
    idx_base, stride_ik, count, kv_limit, PLAN_BK: tl.constexpr, MAX_K_LOG2: tl.constexpr
):
    # Sorted key-block list: the first entry whose block reaches past kv_limit (count if none).
    lo = 0
    hi = count
    for _ in tl.static_range(MAX_K_LOG2 + 1):
        mid = (lo + hi) // 2
        in_range = mid < hi
        kb = tl.load(idx_base + mid * stride_ik, mask=in_range, other=0)
        full = (kb + 1) * PLAN_BK <= kv_limit
        go_right = in_range & full
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(in_range & (~full), mid, hi)
    return lo


def _configs():
    if _INTERPRET:
        return [_cfg(16, 16, 4, 1)]
    # Re-tune: `python benchmarks/bench_kernels.py --sweep wan1.3b_480p_81f,pixart_2k,cogvideox5b_49f`
    # times every variant. On an H200 (triton 3.6) tensor descriptors (USE_TMA, set wherever the inputs
    # allow them) gave +10% at head_dim 128 and 2.2x at 72; warp specialisation changed nothing or failed
    # to compile, so it is not offered.
    return [_cfg(*c) for c in [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)]]


def _cfg(m, n, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def _prune(configs, named_args, **kwargs):
    bq, bk, d = kwargs["PLAN_BQ"], kwargs["PLAN_BK"], kwargs["HEAD_DIM_PAD"]
    out = []
    for c in configs:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bq % m or bk % n:
            continue
        if d > 128 and (m > 64 or n > 64 or c.num_stages > 2):
            continue
        out.append(c)
    if not out:
        out = [_cfg(min(bq, 64), min(bk, 64), 4, 2)]
    return out


@triton.autotune(
    configs=_configs(),
    key=["HEAD_DIM_PAD", "SEQ_BUCKET", "DENSE", "PLAN_BQ", "PLAN_BK", "HAS_KV_LEN", "USE_TMA"],
    prune_configs_by={"early_config_prune": _prune},
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
    DENSE: tl.constexpr,
    HAS_KV_LEN: tl.constexpr,
    DOT_F32: tl.constexpr,
    USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD
    SUB: tl.constexpr = PLAN_BK // BLOCK_N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = _load_tile(q_base, offs_m, stride_qs, offs_d, SEQ_Q, HEAD_DIM, True, EVEN_D)  # [BLOCK_M, D_PAD]
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
        acc, m_i, l_i = _dense_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, SEQ_K,
                                    kv_limit, qk_scale, HEAD_DIM, EVEN_D, DOT_F32, USE_TMA, BLOCK_N)  # fmt: skip
    else:
        row = (pid_m * BLOCK_M) // PLAN_BQ
        idx_base = (
            KV_IDX + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + row.to(tl.int64) * stride_im
        )
        count = tl.load(KV_CNT + b * stride_cb + h * stride_ch + row * stride_cm)
        if count == tl.cdiv(SEQ_K, PLAN_BK):
            # A row that keeps every key block (indices are strictly ascending, so they are 0 .. n-1) runs
            # the dense loop: affine addresses pipeline better than indirect ones (~16% on an H200).
            acc, m_i, l_i = _dense_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_n, offs_d,
                                        SEQ_K, kv_limit, qk_scale, HEAD_DIM, EVEN_D, DOT_F32, USE_TMA,
                                        BLOCK_N)  # fmt: skip
        else:
            n_full = _first_masked_entry(idx_base, stride_ik, count, kv_limit, PLAN_BK, MAX_K_LOG2)
            for t in range(0, n_full * SUB):
                kb = tl.load(idx_base + (t // SUB) * stride_ik)
                start_n = kb * PLAN_BK + (t % SUB) * BLOCK_N
                acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_n,
                                             offs_d, SEQ_K, kv_limit, qk_scale, HEAD_DIM, False, EVEN_D, DOT_F32,
                                             USE_TMA)  # fmt: skip
            for t in range(n_full * SUB, count * SUB):
                kb = tl.load(idx_base + (t // SUB) * stride_ik)
                start_n = kb * PLAN_BK + (t % SUB) * BLOCK_N
                acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_n,
                                             offs_d, SEQ_K, kv_limit, qk_scale, HEAD_DIM, True, EVEN_D, DOT_F32,
                                             USE_TMA)  # fmt: skip

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = o_base + offs_m[:, None].to(tl.int64) * stride_os + offs_d[None, :]
    tl.store(
        o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    )
    tl.store(LSE + pid_bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)


def _dot_f32(q: torch.Tensor) -> bool:
    # Triton's interpreter (3.6) computes bf16 tl.dot wrongly; upcast the operands there only.
    return _INTERPRET and q.dtype == torch.bfloat16


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether per-(batch, head) tensor descriptors can address these (B, H, S, D) views on this GPU."""
    if _INTERPRET or not tensors[0].is_cuda or torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:3]):
            return False
    _ensure_allocator()
    return True


_ALLOCATOR_SET = False


def _ensure_allocator():
    # Device-side tensor descriptors need scratch memory; Triton asks for it through this hook.
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def _head_dim_pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch on (B, H, S, D) views. ``kv_indices is None`` runs every key block (dense).

    kv_indices / kv_counts are [B or 1, H or 1, n_qb, max_k] / [B or 1, H or 1, n_qb] (broadcast by
    zero strides). Returns out (strides like q where q is dense, else contiguous (B, H, S, D)) and
    lse fp32 [B, H, S_q].
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    dense = kv_indices is None
    if dense:
        kv_indices = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=q.device)
        kv_counts = torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device)
    idx = kv_indices.expand(batch, heads, -1, -1)
    cnt = kv_counts.expand(batch, heads, -1)
    max_k = idx.shape[-1]
    kv_len_arg = kv_len if kv_len is not None else lse  # any pointer; unused when HAS_KV_LEN is False

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    _block_sparse_attn_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        idx,
        cnt,
        kv_len_arg,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        idx.stride(0),
        idx.stride(1),
        idx.stride(2),
        idx.stride(3),
        cnt.stride(0),
        cnt.stride(1),
        cnt.stride(2),
        heads,
        seq_q,
        seq_k,
        scale * _LOG2E,
        triton.next_power_of_2(max(seq_q, seq_k)) // 1024,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_head_dim_pad(head_dim),
        PLAN_BQ=block_q,
        PLAN_BK=block_k,
        MAX_K_LOG2=max(int(max_k).bit_length(), 1),
        DENSE=dense,
        HAS_KV_LEN=kv_len is not None,
        DOT_F32=_dot_f32(q),
        USE_TMA=_tma_ok(k, v),
    )
    return out, lse
