"""Triton primitives shared by the attention, refresh and block-mass kernels, and their launch helpers.

Provenance: the online-softmax tile step follows FlashAttention-2 (Dao, 2023) as written in Triton's fused
attention tutorial; scores are kept in base 2 (pre-multiplied by log2 e). What the kernels of this package
add on top: inputs read by strides as (B, H, S, D) views, any sequence length (tails masked), head_dim padded
to a power of two by masked loads, an optional per-batch valid key length, key blocks walked from a sorted
per-row index list (a ``BlockPlan``), and on Hopper K/V tiles loaded through device-side tensor descriptors.

Nothing here is public; kernel modules import these names, never each other's private helpers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import threading
import time
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # host side: folded into the softmax scale
# Inside @triton.jit code a global must be a constexpr (the interpreter accepts plain floats; the compiler not).
LOG2E_C = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Lazy rescaling threshold of the online softmax, in log2 units: unnormalised probabilities stay <= 2**8.
RESCALE_TAU = tl.constexpr(8.0)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------------
# @triton.jit helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def load_tile(
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
def kv_tile(
    base,
    start_n,
    cols,
    stride_s,
    offs_d,
    seq_k,
    HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    # The [BLOCK_N, D_PAD] K or V tile of keys cols = start_n + offs_n: through a tensor descriptor (the copy
    # engine zero-fills rows past the sequence and columns past HEAD_DIM) or by masked pointer loads.
    if USE_TMA:
        tile = base.load([start_n, 0])
    else:
        tile = load_tile(base, cols, stride_s, offs_d, seq_k, HEAD_DIM, MASKED, EVEN_D)
    return tile


@triton.jit
def round_e4m3(x):
    # x (fp32, |x| <= 448) rounded to the nearest float8 e4m3 value (3 mantissa bits, subnormals below
    # 2^-6), so the conversion that follows is exact whatever rounding mode the backend's cast uses.
    e = tl.maximum(tl.floor(tl.math.log2(tl.maximum(tl.abs(x), 1e-30))), -6.0)
    step = tl.math.exp2(e - 3.0)
    return tl.minimum(tl.maximum(tl.floor(x / step + 0.5) * step, -448.0), 448.0)


@triton.jit
def store_residual(resid, r_base, stride_rs, scale_ptrs, offs_m, offs_d, seq_q, HEAD_DIM: tl.constexpr,
                   R_FP8: tl.constexpr):  # fmt: skip
    # Re-ttention's residual R (fp32 [BLOCK_M, D_PAD], zero in the padded columns) stored in R's dtype for the
    # rows offs_m; float8 (e4m3) with a per-row scale max|R_i| / 448 (1 for a zero row) written to scale_ptrs,
    # so each row uses the format's whole range.
    if R_FP8:
        amax = tl.max(tl.abs(resid), 1)
        r_scale = tl.where(amax > 0.0, amax / 448.0, 1.0)
        resid = round_e4m3(resid / r_scale[:, None])
        tl.store(scale_ptrs, r_scale, mask=offs_m < seq_q)
    r_ptrs = r_base + offs_m[:, None].to(tl.int64) * stride_rs + offs_d[None, :]
    tl.store(
        r_ptrs,
        resid.to(r_base.dtype.element_ty),
        mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM),
    )


@triton.jit
def attend_tile(
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
    # One [BLOCK_M, BLOCK_N] step of the online softmax (base 2). With USE_TMA, k_base / v_base are tensor
    # descriptors (kv_tile).
    cols = start_n + offs_n  # [BLOCK_N]
    k = kv_tile(k_base, start_n, cols, stride_ks, offs_d, seq_k, HEAD_DIM, MASKED, EVEN_D, USE_TMA)
    if DOT_F32:
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
    if MASKED:
        qk = tl.where(cols[None, :] < kv_limit, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # A row with no valid key so far keeps m = -inf; subtract 0 instead so nothing becomes NaN.
        m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    else:
        # Lazy rescaling: a row's reference maximum moves only when the tile's maximum exceeds it by more
        # than RESCALE_TAU (so p <= 2**RESCALE_TAU), and the accumulator is rescaled only when some row moved.
        # (m, l, acc) stay consistent with the reference, so out = acc / l and lse = m + log2(l) are exact.
        m_tile = tl.max(qk, 1) * qk_scale
        m_ij = tl.where(m_tile > m_i + RESCALE_TAU, m_tile, m_i)
        m_sub = m_ij
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        acc = acc * alpha[:, None]
    elif tl.min(alpha, 0) < 1.0:
        acc = acc * alpha[:, None]
    v = kv_tile(v_base, start_n, cols, stride_vs, offs_d, seq_k, HEAD_DIM, MASKED, EVEN_D, USE_TMA)
    if DOT_F32:
        # P is rounded to the input dtype first, exactly as the compiled kernel does.
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_ij, l_i


@triton.jit
def dense_loop(
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
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, t * BLOCK_N, offs_n,
                                    offs_d, seq_k, kv_limit, qk_scale, HEAD_DIM, False, EVEN_D, DOT_F32,
                                    USE_TMA)  # fmt: skip
    if n_full * BLOCK_N < kv_limit:
        acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, n_full * BLOCK_N,
                                    offs_n, offs_d, seq_k, kv_limit, qk_scale, HEAD_DIM, True, EVEN_D, DOT_F32,
                                    USE_TMA)  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def first_masked_entry(idx_base, stride_ik, count, kv_limit, PLAN_BK: tl.constexpr, MAX_K_LOG2: tl.constexpr):
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


@triton.jit
def unmasked_entries(
    idx_base,
    stride_ik,
    count,
    kv_limit,
    ANY_LIMIT: tl.constexpr,
    PLAN_BK: tl.constexpr,
    MAX_K_LOG2: tl.constexpr,
):
    # How many leading entries of a sorted key-block list lie wholly below kv_limit. If the last one does,
    # all do. Without a kv_len (ANY_LIMIT False) only the sequence's last block can be partial, so the last
    # entry is the only one to check: one load instead of a chain of MAX_K_LOG2 + 1 dependent ones, which
    # every program paid before its first tile.
    last = tl.load(idx_base + (count - 1) * stride_ik, mask=count > 0, other=0)
    n = count - ((count > 0) & ((last + 1) * PLAN_BK > kv_limit)).to(count.dtype)
    if ANY_LIMIT:
        if n < count:
            n = first_masked_entry(idx_base, stride_ik, count, kv_limit, PLAN_BK, MAX_K_LOG2).to(count.dtype)
    return n


@triton.jit
def plan_loop(
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
    ANY_LIMIT: tl.constexpr,
    PLAN_BK: tl.constexpr,
    MAX_K_LOG2: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The key blocks of one plan row (``count`` sorted indices at idx_base). A row that keeps every key
    # block runs the dense loop: affine addresses pipeline better than indirect ones (0.90x cuDNN against
    # 0.73x at Wan shapes on an H200). Otherwise the blocks that can hold a masked key (sequence tail,
    # kv_len) form a suffix of the sorted list (``unmasked_entries`` finds it; ANY_LIMIT: a kv_len may cut
    # the keys) and only that suffix pays for the mask. The unmasked loop reads the next iteration's block
    # index one iteration ahead, so the tile loads never wait on the index load (+4-10% at densities 0.1-0.5
    # on an H200, docs/kernels.md).
    SUB: tl.constexpr = PLAN_BK // BLOCK_N
    if count == tl.cdiv(seq_k, PLAN_BK):
        acc, m_i, l_i = dense_loop(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, offs_n, offs_d, seq_k,
                                   kv_limit, qk_scale, HEAD_DIM, EVEN_D, DOT_F32, USE_TMA, BLOCK_N)  # fmt: skip
    else:
        kb_next = tl.load(idx_base, mask=count > 0, other=0)
        n_full = unmasked_entries(idx_base, stride_ik, count, kv_limit, ANY_LIMIT, PLAN_BK, MAX_K_LOG2)
        n_unmasked = n_full * SUB
        for t in range(0, n_unmasked):
            kb = kb_next
            kb_next = tl.load(idx_base + ((t + 1) // SUB) * stride_ik, mask=t + 1 < n_unmasked, other=0)
            start_n = kb * PLAN_BK + (t % SUB) * BLOCK_N
            acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_n,
                                        offs_d, seq_k, kv_limit, qk_scale, HEAD_DIM, False, EVEN_D, DOT_F32,
                                        USE_TMA)  # fmt: skip
        for t in range(n_full * SUB, count * SUB):
            kb = tl.load(idx_base + (t // SUB) * stride_ik)
            start_n = kb * PLAN_BK + (t % SUB) * BLOCK_N
            acc, m_i, l_i = attend_tile(acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_vs, start_n, offs_n,
                                        offs_d, seq_k, kv_limit, qk_scale, HEAD_DIM, True, EVEN_D, DOT_F32,
                                        USE_TMA)  # fmt: skip
    return acc, m_i, l_i


# --------------------------------------------------------------------------------------------------
# autotune configs and launch helpers
# --------------------------------------------------------------------------------------------------
def cfg(m: int, n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, warps, stages) of the attention and refresh kernels' autotuner (attention_configs).
_TILES = ((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3))
_LOW_DENSITY_TILES = ((128, 64, 8, 4), (64, 128, 4, 3), (64, 128, 4, 4))


def attention_configs() -> list[triton.Config]:
    """Tile candidates of the attention and refresh kernels.

    Re-tune: ``python benchmarks/bench_kernels.py --sweep wan1.3b_480p_81f,pixart_2k,cogvideox5b_49f`` times
    every variant; ``benchmarks/ab_plan_loop.py`` compares source variants of the key-block loop and this list. On an H200 (triton 3.6) tensor descriptors (set wherever the inputs allow them) gave +10%
    at head_dim 128 and 2.2x at 72; warp specialisation changed nothing or failed to compile, so it is not
    offered. The deeper-pipelined 128x64 and the 64x128 tiles won at low densities at Wan-14B's shape (0.86x
    cuDNN against 0.82x at density 0.1).
    """
    if INTERPRET:
        return [cfg(16, 16, 4, 1)]
    return [cfg(*c) for c in (*_TILES, *_LOW_DENSITY_TILES)]


def prune_configs(configs, named_args, **kwargs):
    """Keep the tiles that divide the plan's blocks; large head dims get small tiles and few stages."""
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
        out = [cfg(min(bq, 64), min(bk, 64), 4, 2)]
    return out


def dot_f32(q: torch.Tensor) -> bool:
    """Triton's interpreter (3.6) computes bf16 ``tl.dot`` wrongly; upcast the operands there only."""
    return INTERPRET and q.dtype == torch.bfloat16


@functools.cache
def _capability_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether per-(batch, head) tensor descriptors can address these (B, H, S, D) views on this GPU."""
    if INTERPRET or not tensors[0].is_cuda or _capability_major(tensors[0].device) < 9:
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


# (autotuned kernel, its tuning key values, argument dtypes) -> the config its autotuner picked, and that
# config's parameters (BLOCK_M, num_warps, ...) as launch keywords.
_TUNED: dict = {}

# Direct launches: a compiled kernel recorded per exact launch key (see _exact_key), launched through its
# C launcher without Triton's argument binder. The launcher's call convention is Triton-internal, so this is
# on only for the Triton versions it was checked on (GPU tests compare it bit for bit with JITFunction.run);
# DIT_ACCEL_DIRECT_LAUNCH=0 turns it off.
_DIRECT_VERSIONS = ("3.6.",)
_DIRECT_ON = (
    not INTERPRET
    and triton.__version__.startswith(_DIRECT_VERSIONS)
    and os.environ.get("DIT_ACCEL_DIRECT_LAUNCH", "1") != "0"
)
_COMPILED: dict = {}
_COMPILED_MAX = 4096


def _arg_spec(a):
    """What Triton specialises a launch argument on, or something finer: a tensor's dtype and 16-byte
    alignment, an int's or bool's exact value (it picks i32/i64 and the ==1 / %16 specialisations), a
    float's type only (fp32, never specialised), anything else (None) itself."""
    t = type(a)
    if t is int or t is bool:
        return t, a
    if t is float:
        return float
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    return t, a


def _exact_key(kernel, config, grid, device: int, args, kwargs) -> tuple:
    """Everything that selects the compiled kernel and the grid of one launch. Two launches with one key
    would get the same specialisation from Triton's binder: the key holds what the binder reads (argument
    types, alignments, int values, every constexpr) or more, plus the debug and instrumentation knobs."""
    knobs = triton.knobs
    return (
        kernel,
        id(config),
        grid,
        device,
        knobs.runtime.debug,
        knobs.compilation.instrumentation_mode,
        *map(_arg_spec, args),
        *kwargs.items(),
    )


def _launch_hooks_set() -> bool:
    # Triton 3.6 keeps its launch hooks as (usually empty) hook chains; older versions as callables or None.
    runtime = triton.knobs.runtime
    return any(
        hook is not None and getattr(hook, "calls", True)
        for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook)
    )


def _direct_launch(key, grid, device: int, args) -> bool:
    """Launch the kernel recorded for ``key`` (which holds ``grid`` and ``device``) through its C launcher;
    False when there is none (or a launch hook, e.g. a profiler, wants Triton's own path)."""
    hit = _COMPILED.get(key)
    if hit is None or _launch_hooks_set():
        return False
    compiled, tail = hit
    stream = triton.runtime.driver.active.get_current_stream(device)
    compiled.run(
        grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
        *args, *tail,
    )  # fmt: skip
    return True


def _record(key, jit_fn, compiled, n_args: int, named: dict) -> None:
    # The launcher takes every parameter in signature order (constexpr slots are passed and ignored): the
    # positional arguments, then the rest by name from the keywords and the config's parameters.
    params = list(jit_fn.signature.parameters)[n_args:]
    if any(name not in named for name in params):
        return  # a parameter left to its default: keep Triton's binder for this kernel
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.clear()
    _COMPILED[key] = (compiled, tuple(named[name] for name in params))


# How a tuning key's first launch picks its config among the pruned candidates (DIT_ACCEL_TUNER):
# - "triton": Triton's autotuner, which times the candidates one after another (``do_bench`` defaults: 25 ms of
#   warm-up, 100 ms of repetitions, so about four calls of a 26 ms kernel each). A slow stretch of the GPU
#   lands on whichever candidate is timed then: at Wan-14B it once picked a tile 11% slower than the best.
# - "interleaved": :func:`tune_interleaved`, every candidate once per round, many rounds, medians.
TUNERS = ("triton", "interleaved")
_TUNER = os.environ.get("DIT_ACCEL_TUNER", "triton")
if _TUNER not in TUNERS:
    raise ValueError(f"DIT_ACCEL_TUNER must be one of {TUNERS}, got {_TUNER!r}")
TUNE_MIN_ROUNDS = 5
TUNE_MAX_ROUNDS = 50
TUNE_BUDGET_MS = 400.0  # rounds stop once the candidates' timed calls add up to this (after the minimum)
_SPIN_CYCLES = 4_000_000  # ~2 ms at H200 clocks: the host queues a whole round behind it
# Zeroed before each timed call, as triton.testing.do_bench does: every candidate starts with a cold L2. Without
# it each candidate finds the previous one's last K/V blocks in L2, which favours the tiles that re-read K/V
# most (docs/kernels.md: the interleaved tuner picked 64x64 at Wan-14B, 7.5% slower under do_bench). Allocated
# per round, not kept: PyTorch's caching allocator serves the next round's from its cache, and once tuning is
# done the block is free for the model's own tensors (a buffer kept by this module held 256 MB of the GPU for
# the life of the process).
_FLUSH_BYTES = 256 * 2**20
# Tuning record per key of _TUNED: the tuner, each candidate's median ms (interleaved) and the wall seconds.
_TUNING: dict = {}


def candidate_configs(kernel, args, kwargs) -> list[triton.Config]:
    """The configs a ``@triton.autotune`` kernel would time for this launch (its early pruning applied)."""
    configs = list(kernel.configs)
    if kernel.early_config_prune is not None:
        configs = list(kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)), **kwargs))
    return configs


def cuda_round_timer(calls, flush_l2: bool = True) -> list[float]:
    """Milliseconds of each of ``calls`` run once, in order, on the current stream. A spin kernel goes first
    so the host has queued the whole round before the GPU reaches it: the events then time the kernels, not
    the host's launch gaps between them. ``flush_l2``: zero a 256 MB buffer before each call (untimed), so
    every call starts with a cold L2 as under ``do_bench``. The calls should be warm (run once before):
    a first call's host set-up (compilation, a library's initialisation) outlasts the spin and is timed."""
    start = [torch.cuda.Event(enable_timing=True) for _ in calls]
    end = [torch.cuda.Event(enable_timing=True) for _ in calls]
    flush = torch.empty(_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda") if flush_l2 else None
    torch.cuda._sleep(_SPIN_CYCLES)
    for s, e, call in zip(start, end, calls):
        if flush is not None:
            flush.zero_()
        s.record()
        call()
        e.record()
    end[-1].synchronize()
    return [s.elapsed_time(e) for s, e in zip(start, end)]


def tune_interleaved(calls, time_round=cuda_round_timer, min_rounds: int = TUNE_MIN_ROUNDS,
                     max_rounds: int = TUNE_MAX_ROUNDS, budget_ms: float = TUNE_BUDGET_MS):  # fmt: skip
    """(index of the fastest of ``calls``, each call's median ms). Every round times each call once; round r
    starts at call r mod n (no call always runs first, right after the spin). Rounds continue until
    ``min_rounds`` are done and the timed calls add up to ``budget_ms``, or ``max_rounds``. A drift of the
    GPU's speed over the tuning (clocks, power, a neighbour) hits every candidate alike; ties go to the
    earlier call."""
    n = len(calls)
    times: list[list[float]] = [[] for _ in calls]
    spent = 0.0
    for r in range(max_rounds):
        order = [(r + i) % n for i in range(n)]
        for i, ms in zip(order, time_round([calls[i] for i in order])):
            times[i].append(ms)
            spent += ms
        if r + 1 >= min_rounds and spent >= budget_ms:
            break
    medians = [statistics.median(ts) for ts in times]
    return min(range(n), key=lambda i: (medians[i], i)), medians


_COMPILE_ERRORS: tuple = ()


def _compile_errors() -> tuple:
    # What a candidate that cannot run raises at its first call (the autotuner skips those too).
    global _COMPILE_ERRORS
    if not _COMPILE_ERRORS:
        from triton.compiler.errors import CompileTimeAssertionFailure
        from triton.runtime.errors import OutOfResources, PTXASError

        _COMPILE_ERRORS = (OutOfResources, CompileTimeAssertionFailure, PTXASError)
    return _COMPILE_ERRORS


def _tune(kernel, grid, args, kwargs) -> tuple[triton.Config, dict]:
    """``kernel``'s config for this launch, picked by :func:`tune_interleaved` over its candidates, and the
    tuning record. Each candidate runs once first (Triton compiles it); one that does not fit the GPU is
    dropped."""
    configs = candidate_configs(kernel, args, kwargs)
    t0 = time.perf_counter()
    runnable, calls, first_error = [], [], None
    for config in configs:
        meta = config.all_kwargs()

        def call(meta=meta):
            kernel.fn[grid](*args, **kwargs, **meta)

        try:
            call()
        except _compile_errors() as e:
            first_error = first_error or e
            continue
        runnable.append(config)
        calls.append(call)
    if not runnable:
        raise first_error
    best, ms = 0, None  # a single candidate is not timed
    if len(runnable) > 1:
        best, medians = tune_interleaved(calls, cuda_round_timer)
        ms = {str(c): round(m, 4) for c, m in zip(runnable, medians)}
    record = {"tuner": "interleaved", "ms": ms, "seconds": round(time.perf_counter() - t0, 3)}
    return runnable[best], record


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` for a ``@triton.autotune`` kernel whose tuning keys are all passed by
    keyword, whose configs have no pre-hook, and whose grid (a tuple, or a function of the config's
    parameters only) depends on nothing but the launch's own arguments.

    The first launch for a tuning key goes through the autotuner (which tunes on a miss), or with
    ``DIT_ACCEL_TUNER=interleaved`` through :func:`tune_interleaved` over the autotuner's candidates; later
    launches with that key call the JIT function with the recorded config directly. The autotuner otherwise rebuilds dicts of
    all ~50 arguments on every launch to find its key: host time that a host-bound model (short sequences,
    many small calls) pays on every attention call. Where direct launches are on, a launch whose exact key
    (:func:`_exact_key`) was seen before skips Triton's binder as well and calls the compiled kernel's
    launcher.
    """
    key = (
        kernel,
        *(kwargs[name] for name in kernel.keys),
        *(a.dtype for a in args if isinstance(a, torch.Tensor)),
    )
    tuned = _TUNED.get(key)
    if tuned is None:
        if _TUNER == "interleaved" and all(c.pre_hook is None for c in kernel.configs):
            config, _TUNING[key] = _tune(kernel, grid, args, kwargs)
            kernel.best_config = config
            kernel.fn[grid](*args, **kwargs, **config.all_kwargs())  # the launch's own output, by the pick
            _TUNED[key] = (config, config.all_kwargs())
            return
        t0 = time.perf_counter()
        kernel[grid](*args, **kwargs)
        if kernel.best_config.pre_hook is None:
            _TUNED[key] = (kernel.best_config, kernel.best_config.all_kwargs())
            _TUNING[key] = {"tuner": "triton", "seconds": round(time.perf_counter() - t0, 3)}
        return
    config, meta = tuned
    _launch_fn(kernel.fn, config, grid, args, kwargs, meta)


def launch_jit(fn, grid, *args, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)`` for a plain ``@triton.jit`` function (no autotuning; launch options such
    as ``num_warps`` among the keywords): a direct launch where :func:`launch` would make one, and seen by
    :func:`recording`. ``grid`` is a tuple."""
    _launch_fn(fn, None, grid, args, kwargs, {})


def _launch_fn(fn, config, grid, args, kwargs, meta) -> None:
    seen = getattr(_LOCAL, "launches", None)
    if not _DIRECT_ON:
        fn[grid](*args, **kwargs, **meta)
        if seen is not None:
            seen.append(Launch(fn, grid, args, {**kwargs, **meta}, None, None))
        return
    grid = grid(meta) if callable(grid) else grid
    grid = (*grid, 1, 1)[:3]
    device = triton.runtime.driver.active.get_current_device()
    exact = _exact_key(fn, config, grid, device, args, kwargs)
    if not _direct_launch(exact, grid, device, args):
        compiled = fn[grid](*args, **kwargs, **meta)
        if compiled is not None and not hasattr(compiled, "result"):
            _record(exact, fn, compiled, len(args), {**kwargs, **meta})
    if seen is not None:
        seen.append(Launch(fn, grid, args, {**kwargs, **meta}, _COMPILED.get(exact), device))


class Launch(NamedTuple):
    """One launch made by :func:`launch` inside :func:`recording`: the JIT function, its grid, positional
    arguments and keywords (the tuned config's included), and where direct launches are on, the compiled
    kernel with its trailing arguments (``_COMPILED``'s entry) and the device."""

    fn: object
    grid: object
    args: tuple
    kwargs: dict
    compiled: tuple | None
    device: int | None


_LOCAL = threading.local()


@contextlib.contextmanager
def recording():
    """The launches :func:`launch` makes inside the block, in order (a list of :class:`Launch`), for
    :class:`Replay`. Per thread: another thread's launches are not seen."""
    outer = getattr(_LOCAL, "launches", None)
    _LOCAL.launches = launches = []
    try:
        yield launches
    finally:
        _LOCAL.launches = outer


def launch_context() -> tuple:
    """What a direct launch depends on beyond its arguments: the current device and Triton's debug and
    instrumentation knobs (empty where launches go through Triton's binder, which reads them itself)."""
    if not _DIRECT_ON:
        return ()
    knobs = triton.knobs
    return (
        triton.runtime.driver.active.get_current_device(),
        knobs.runtime.debug,
        knobs.compilation.instrumentation_mode,
    )


class Replay:
    """A recorded :class:`Launch`, launched again with other tensors in its tensor arguments.

    ``slots`` maps the position of each tensor argument to an index into the tensors a replay is given; every
    other argument (ints, floats, None) is the recorded one. So a replay is the recorded launch with new data
    pointers: the caller guarantees the new tensors have the recorded tensors' dtypes, 16-byte alignment,
    shapes and strides (everything else the kernel read from them was recorded as an argument). Where the
    launch was direct, the replay calls the same compiled kernel's launcher; otherwise (and while a launch
    hook, e.g. a profiler, is set) it launches through the JIT function with the recorded keywords."""

    __slots__ = ("_fn", "_grid", "_kwargs", "_spec", "_compiled", "_device")

    def __init__(self, launch: Launch, slots: dict[int, int]):
        self._fn, self._grid, self._kwargs = launch.fn, launch.grid, launch.kwargs
        self._spec = tuple((slots.get(i), None if i in slots else a) for i, a in enumerate(launch.args))
        self._compiled, self._device = launch.compiled, launch.device

    @classmethod
    def of(cls, launch: Launch, roles) -> Replay | None:
        """The replay of ``launch`` whose tensor arguments are filled from ``roles`` (a sequence of tensors or
        None), each tensor argument taking the role with its data pointer. None where one of them matches no
        role or two roles share its pointer (the roles of a later call could differ there), or a keyword is
        a tensor."""
        owner: dict[int, int] = {}
        for r, t in enumerate(roles):
            if t is not None:
                p = t.data_ptr()
                owner[p] = r if owner.get(p, r) == r else -1
        slots = {}
        for i, a in enumerate(launch.args):
            if isinstance(a, torch.Tensor):
                r = owner.get(a.data_ptr(), -1)
                if r < 0:
                    return None
                slots[i] = r
        if any(isinstance(a, torch.Tensor) for a in launch.kwargs.values()):
            return None
        return cls(launch, slots)

    def __call__(self, tensors) -> None:
        args = [a if r is None else tensors[r] for r, a in self._spec]
        if self._compiled is not None and not _launch_hooks_set():
            compiled, tail = self._compiled
            grid = self._grid
            compiled.run(
                grid[0], grid[1], grid[2], triton.runtime.driver.active.get_current_stream(self._device),
                compiled.function, compiled.packed_metadata, None, None, None, *args, *tail,
            )  # fmt: skip
        else:
            self._fn[self._grid](*args, **self._kwargs)


def tuned_configs() -> list[dict]:
    """The tiles the autotuners picked so far in this process, one dict per tuning key: the kernel's name,
    its tuning key values, the config, and how it was tuned (``tuning``: the tuner, its wall seconds, compiles
    included, and with the interleaved tuner every candidate's median ms). For benchmark records; the key
    holds no plan density, so the first launch of a key decides the tile for every later density."""
    out = []
    for key, (config, _meta) in _TUNED.items():
        kernel = key[0]
        names = list(kernel.keys)
        out.append(
            {
                "kernel": kernel.fn.__name__,
                "key": dict(zip(names, (str(v) for v in key[1 : 1 + len(names)]))),
                "dtypes": [str(d) for d in key[1 + len(names) :]],
                "config": str(config),
                "tuning": _TUNING.get(key),
            }
        )
    return out


def _pow2_at_least(n: int) -> int:
    # triton.next_power_of_2 is a JIT function: calling it from Python costs a microsecond per call.
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def head_dim_pad(d: int) -> int:
    return max(16, _pow2_at_least(d))


def seq_bucket(seq_q: int, seq_k: int) -> int:
    """Coarse autotune key: sequence lengths within a power of two share their tuning."""
    return _pow2_at_least(max(seq_q, seq_k)) // 1024


@functools.cache
def _dummy_plan(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Never read (DENSE runs every key block); cached so a dense launch allocates and fills nothing.
    return (
        torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device),
        torch.zeros(1, 1, 1, dtype=torch.int32, device=device),
    )


def _broadcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    # A dimension of size 1 is broadcast over batch or heads: stride 0.
    return tuple(st if n != 1 else 0 for n, st in zip(t.shape, t.stride()))


def plan_args(kv_indices, kv_counts, device):
    """(indices, counts, index strides (4), count strides (3), max_k): a plan's [B or 1, H or 1, ...] tensors
    with zero strides on their broadcast dimensions; a dummy plan when None."""
    if kv_indices is None:
        kv_indices, kv_counts = _dummy_plan(device)
    return (
        kv_indices,
        kv_counts,
        _broadcast_strides(kv_indices),
        _broadcast_strides(kv_counts),
        kv_indices.shape[-1],
    )
