"""AdaSpa: online block selection from exact attention mass, searched at a few steps and cached.

Paper: "Training-free and Adaptive Sparse Attention for Efficient Long Video Generation" (no public
code). This module holds the pure pieces of the method: block selection, head recall, head-adaptive
sparsity tiers, the step schedule, the two search steps written against ``dit_accel.kernels``, and
:class:`AdaspaMethod`, which runs the schedule per (CFG context, layer) behind the processors (the last
section below; docs/adaspa.md has the user-facing account).

Block mass
----------
Per (batch, head), with scores s_ij = q_i . k_j * scale and a per-row log-sum-exp L_i,

    W[p, c] = sum_{i in query block p} sum_{j in key block c} exp(s_ij - L_i)

(``dit_accel.kernels.block_mass``). With the fresh L_i = log sum_j exp(s_ij) of a dense pass, W[p, c] is
the exact attention mass of query block p on key block c and each row sums to the number of valid query
rows in block p. With a stale L_i (cached from an earlier step) every query row i is weighted by
exp(L_i^fresh - L_i^stale), so rows that got sharper since then count more; a selection is *not*
invariant to this when a query block holds more than one row.

Top-k selection (``select_topk``)
---------------------------------
With n_kb key blocks and sparsity s (a float, or per head [H] or [B, H]), every query-block row keeps its
k = round_half_up((1 - s) * n_kb) heaviest key blocks, clamped to 1 <= k <= n_kb; k is the same for every
row of a head so no query region goes unattended. Ties in W are broken towards the lower key-block index
(a stable descending sort), so the selection is deterministic across devices and runs.

Coverage selection (``select_coverage``)
----------------------------------------
With target tau in (0, 1], row p keeps the fewest blocks, taken in the same heaviest-first order, whose
mass reaches tau * sum_c W[p, c]: block number m (0-based in that order) is kept iff the mass of the m
blocks before it is < tau * total. At least one block is kept (an all-zero row keeps block 0). Sums are
taken in float64.

Text blocks
-----------
Text tokens are always kept: every query attends all text keys, and text queries attend everything.
They are given per axis as a boolean tensor over *blocks*, ``text_k_blocks`` [n_kb] and ``text_q_blocks``
[n_qb] (None: no text). A block that holds any text token is a text block (``text_block_mask`` builds
the mask from a text length and side). Text key blocks are OR-ed into every row after the top-k /
coverage choice, in which they compete like any other block: a row holds between k and k + n_text
blocks. Text query-block rows keep every key block.

Head recall and head-adaptive sparsity
--------------------------------------
recall_h = sum_{kept (p, c)} W[p, c] / sum_{p, c} W[p, c] per (batch, head) (1 for a head with no mass).

At base sparsity s, with recall measured on the selection at s: n = #{h : recall_h > 0.8}, clamped to
n <= floor(H / 2). The n highest-recall heads (concentrated heads, which lose little when pruned harder)
get s + d, the n lowest-recall heads get s - d, the others s, where the paper's offset is
d = (1 - s) / 2, i.e. (1 + s) / 2 and (3s - 1) / 2. The mean sparsity over heads is s by symmetry.

For s < 1/3 the paper's low tier (3s - 1) / 2 is negative. Clamping it to 0 would raise the mean sparsity
above s (the method would silently run sparser than asked). Instead the offset shrinks symmetrically,

    d = min((1 - s) / 2, s),

so the low tier is max((3s - 1) / 2, 0) = s - d >= 0, the high tier is s + d <= (1 + s) / 2 < 1, and the
mean stays exactly s for every s in [0, 1). At s = 0 every head stays dense. Heads with equal recall are
ranked by head index (lower index = higher rank). The mean is exact in sparsity; the rounded k per head
can differ from it by up to half a block per head.

Schedule (``AdaspaSchedule``)
-----------------------------
Fractions f of the step count map to step index round_half_up(f * num_steps); ints are step indices.
With warm-up count w:

- steps < w: ``dense``;
- step w: ``fused_search``: a dense pass that also returns the LSE, then block mass with that fresh LSE
  -> plan; the LSE and the plan are cached, the dense output is the step's result;
- each search step t with w < t < num_steps: ``cached_search``: block mass with the current q, k and the
  LSE cached at step w (no P.V) -> a new plan, used from step t on (step t itself runs sparse with it);
- every other step: ``sparse`` with the latest plan.

50 steps with the defaults (warmup=0.2, search_at=(0.6,)): 0-9 dense, 10 fused search, 11-29 sparse,
30 cached search, 31-49 sparse. Degenerate cases: a fused search on the last step would compute a plan
that no step uses, so when w >= num_steps - 1 every step is dense (1 step: dense only). Search steps at
or before the fused search, or past the end, are dropped. Small runs keep the rule literally: 2 steps
give fused search, cached search (w rounds to 0; step 0 is still computed densely); 3 steps give dense,
fused search, cached search.

The method (``AdaspaMethod``)
-----------------------------
Per (CFG context, layer) one cache entry holds the latest plan (int32 index lists, ``BlockPlan``) and,
between the fused search and the last cached search, the LSE of the fused search. Per call, by the phase
of its step:

- ``dense``: the stock diffusers op;
- ``fused_search``: dit_accel's dense attention with LSE (its output is the step's output), block mass
  with that LSE -> plan; the LSE is kept when a cached search follows;
- ``cached_search``: block mass of the current q, k under the kept LSE -> a new plan, run sparse;
- ``sparse``: the entry's latest plan; after the last cached search the LSE is released.

A step that needs a plan but finds none (the run started past the fused search, a layer first runs late
as Wan 2.2's second expert does, the geometry changed) runs a fused search at that step. The warm-up is
``warmup`` when given, else the config's ``dense_steps`` when set (its count, or floor(fraction * n) as
everywhere in the config), else 0.2; giving both is an error.

``max_cache_bytes`` bounds the kept LSE of all entries of a run: the LSE is stored in fp32 when the
predicted total (this LSE x layers x CFG contexts) fits, else in fp16 (for |LSE| < 32 fp16 rounds by
<= 2^-7, so a row's weight exp(L_fresh - L_stale) moves by < 0.8%; bf16: up to 6.5%); an entry whose LSE
does not fit even in fp16 keeps none and skips its cached searches (it keeps its fused-search plan).
Entries are served in call order (layer order, then CFG context). Plans are always kept: every sparse
step needs them.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import torch

from dit_accel.kernels import BlockPlan, block_mass, dense_attention
from dit_accel.kernels.plan import num_blocks

from .base import AttentionCall
from .composed import ComposedMethod, Pattern
from .schedule import Phase, Schedule

__all__ = [
    "AdaspaMethod",
    "AdaspaSchedule",
    "Phase",
    "SearchInfo",
    "SearchedPattern",
    "cached_search",
    "fused_search",
    "head_adaptive_sparsity",
    "head_recall",
    "select_coverage",
    "select_topk",
    "text_block_mask",
]

RECALL_THRESHOLD = 0.8
DEFAULT_WARMUP = 0.2

logger = logging.getLogger("dit_accel")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _check_mass(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 4 or not W.dtype.is_floating_point:
        shape = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W must be a floating tensor [B, H, n_qb, n_kb], got {shape}")
    if W.shape[-1] == 0 or W.shape[-2] == 0:
        raise ValueError(f"W has no blocks: {tuple(W.shape)}")


def _per_head(
    value, W: torch.Tensor, name: str, low: float, high: float, closed_low: bool, trusted: bool = False
) -> torch.Tensor:
    """A float, [H] or [B, H] (B may be 1) value as float64 [B, H] on W's device, range-checked: on the host
    for a number, on the device (one synchronisation) for a tensor unless ``trusted`` (made in range here)."""
    batch, heads = W.shape[:2]
    bracket = "[" if closed_low else "("
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        if not ((v >= low) if closed_low else (v > low)) or not v <= high:
            raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value}")
        return torch.full((batch, heads), v, dtype=torch.float64, device=W.device)
    t = torch.as_tensor(value, dtype=torch.float64).to(W.device)
    if t.dim() == 1:
        if t.shape[0] != heads:
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not match H={heads}")
        t = t.view(1, heads)
    if t.dim() == 2 and (t.shape[1] != heads or t.shape[0] not in (1, batch)):
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not match [B, H]=[{batch}, {heads}]")
    if t.dim() > 2:
        raise ValueError(f"{name} must be a float, [H] or [B, H], got shape {tuple(t.shape)}")
    t = t.expand(batch, heads)
    if not trusted:
        lo_ok = (t >= low) if closed_low else (t > low)
        if not bool((lo_ok & (t <= high)).all()):
            raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value}")
    return t


def _check_text(mask, n: int, axis: str, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"text_{axis}_blocks must be a bool tensor of shape [{n}], got {got}")
    return mask.to(device)


def _add_text(mask: torch.Tensor, text_q_blocks, text_k_blocks) -> torch.Tensor:
    n_qb, n_kb = mask.shape[-2:]
    tk = _check_text(text_k_blocks, n_kb, "k", mask.device)
    tq = _check_text(text_q_blocks, n_qb, "q", mask.device)
    if tk is not None:
        mask = mask | tk.view(1, 1, 1, n_kb)
    if tq is not None:
        mask = mask | tq.view(1, 1, n_qb, 1)
    return mask


def _scatter_sorted(order: torch.Tensor, counts: torch.Tensor, shape) -> torch.Tensor:
    """Bool mask of ``shape`` keeping, per row, the first ``counts`` entries of ``order`` (a permutation of
    the last axis, so every position is written once: no host synchronisation)."""
    keep = torch.arange(order.shape[-1], device=order.device) < counts.unsqueeze(-1)
    return torch.empty(shape, dtype=torch.bool, device=order.device).scatter_(-1, order, keep)


def _topk_mask(
    W: torch.Tensor, sparsity, text_q_blocks, text_k_blocks, trusted: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_mass(W)
    s = _per_head(sparsity, W, "sparsity", 0.0, 1.0, closed_low=True, trusted=trusted)
    n_kb = W.shape[-1]
    k = torch.floor((1.0 - s) * n_kb + 0.5).long().clamp(1, n_kb)  # [B, H]
    order = torch.sort(W, dim=-1, descending=True, stable=True).indices
    counts = k[:, :, None].expand(W.shape[:3])
    mask = _scatter_sorted(order, counts, W.shape)
    return _add_text(mask, text_q_blocks, text_k_blocks), s


def _coverage_mask(W: torch.Tensor, tau, text_q_blocks, text_k_blocks) -> torch.Tensor:
    _check_mass(W)
    t = _per_head(tau, W, "tau", 0.0, 1.0, closed_low=False)
    vals, order = torch.sort(W, dim=-1, descending=True, stable=True)
    cum = vals.double().cumsum(-1)
    before = torch.nn.functional.pad(cum[..., :-1], (1, 0))
    target = t[:, :, None, None] * cum[..., -1:]
    counts = (before < target).sum(-1).clamp(min=1)
    mask = _scatter_sorted(order, counts, W.shape)
    return _add_text(mask, text_q_blocks, text_k_blocks)


def text_block_mask(
    seq_len: int, block: int, text_len: int, *, text_first: bool, device: torch.device | str | None = None
) -> torch.Tensor:
    """Bool [ceil(seq_len / block)]: the blocks that hold at least one text token.

    Args:
        seq_len: tokens in the sequence (text included).
        block: block size along this axis.
        text_len: number of text tokens (0: none), at the start (``text_first``) or the end of the sequence.
        text_first: True when text precedes the video/image tokens (CogVideoX, Flux, Qwen), False when it
            follows them (HunyuanVideo, Mochi, SD3).
    """
    if not 0 <= text_len <= seq_len:
        raise ValueError(f"text_len {text_len} must lie in [0, seq_len={seq_len}]")
    n = num_blocks(seq_len, block)
    ids = torch.arange(n, device=device)
    if text_len == 0:
        return torch.zeros(n, dtype=torch.bool, device=device)
    if text_first:
        return ids <= (text_len - 1) // block
    return ids >= (seq_len - text_len) // block


# --------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------
def select_topk(
    W: torch.Tensor,
    sparsity: float | torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    text_q_blocks: torch.Tensor | None = None,
    text_k_blocks: torch.Tensor | None = None,
) -> BlockPlan:
    """Keep the top k = round((1 - s) * n_kb) key blocks of every query-block row, plus text.

    Args:
        W: block mass, float [B, H, n_qb, n_kb].
        sparsity: s in [0, 1]: a float, or per head [H] or [B, H]. k is clamped to [1, n_kb].
        block_q, block_k: the block sizes W was computed with (stored in the plan).
        text_q_blocks: optional bool [n_qb]; these query-block rows keep every key block.
        text_k_blocks: optional bool [n_kb]; these key blocks are kept in every row.

    Returns:
        BlockPlan with B, H of W. Ties in W go to the lower key-block index.
    """
    mask, _ = _topk_mask(W, sparsity, text_q_blocks, text_k_blocks)
    return BlockPlan.from_block_mask(mask, block_q, block_k)


def select_coverage(
    W: torch.Tensor,
    tau: float | torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    text_q_blocks: torch.Tensor | None = None,
    text_k_blocks: torch.Tensor | None = None,
) -> BlockPlan:
    """Keep, per query-block row, the fewest heaviest key blocks whose mass reaches tau of the row's total.

    Args:
        W: block mass, float [B, H, n_qb, n_kb].
        tau: target fraction in (0, 1]: a float, or per head [H] or [B, H].
        block_q, block_k, text_q_blocks, text_k_blocks: as in :func:`select_topk`.

    Returns:
        BlockPlan with B, H of W; at least one key block per row.
    """
    mask = _coverage_mask(W, tau, text_q_blocks, text_k_blocks)
    return BlockPlan.from_block_mask(mask, block_q, block_k)


def head_recall(W: torch.Tensor, mask: torch.Tensor | BlockPlan) -> torch.Tensor:
    """Kept mass over total mass per (batch, head).

    Args:
        W: block mass, float [B, H, n_qb, n_kb].
        mask: bool block mask broadcastable to W, or a BlockPlan over the same blocks.

    Returns:
        fp32 [B, H]; 1 for a head whose total mass is 0 (nothing to miss).
    """
    _check_mass(W)
    if isinstance(mask, BlockPlan):
        if mask.num_q_blocks != W.shape[2] or mask.num_kv_blocks != W.shape[3]:
            raise ValueError(
                f"plan covers {mask.num_q_blocks}x{mask.num_kv_blocks} blocks, W {tuple(W.shape[2:])}"
            )
        mask = mask.to(W.device).to_block_mask()
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    w = W.double()
    total = w.sum((-2, -1))
    kept = torch.where(mask, w, 0.0).sum((-2, -1))
    recall = torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), 1.0)
    return recall.float()


def head_adaptive_sparsity(
    recall: torch.Tensor, s: float, *, threshold: float = RECALL_THRESHOLD
) -> torch.Tensor:
    """Per-head sparsity tiers from the recall measured at base sparsity s (module docstring).

    Args:
        recall: [B, H] (or [H]) recall of each head at base sparsity s.
        s: base sparsity in [0, 1).
        threshold: recall above which a head counts as concentrated (0.8 in the paper).

    Returns:
        float32 [B, H] (or [H]) in [0, 1) with mean s over the heads of each batch entry: the n
        highest-recall heads get s + d, the n lowest s - d, the rest s, with n = #{recall > threshold}
        clamped to floor(H / 2) and d = min((1 - s) / 2, s).
    """
    if not 0.0 <= float(s) < 1.0:
        raise ValueError(f"base sparsity must lie in [0, 1), got {s}")
    squeeze = recall.dim() == 1
    r = recall.unsqueeze(0) if squeeze else recall
    if r.dim() != 2:
        raise ValueError(f"recall must be [B, H] or [H], got {tuple(recall.shape)}")
    heads = r.shape[1]
    n = (r > threshold).sum(-1).clamp(max=heads // 2)  # [B]
    order = torch.sort(r, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(heads, device=r.device).expand_as(order))
    s = float(s)
    d = min((1.0 - s) / 2.0, s)
    out = torch.full(r.shape, s, dtype=torch.float64, device=r.device)
    out = torch.where(rank < n[:, None], s + d, out)
    out = torch.where(rank >= heads - n[:, None], s - d, out)
    out = out.clamp(0.0, math.nextafter(1.0, 0.0)).float()
    return out.squeeze(0) if squeeze else out


# --------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------
def AdaspaSchedule(  # noqa: N802 - reads as the schedule type it returns
    num_steps: int, warmup: float | int = DEFAULT_WARMUP, search_at: tuple[float | int, ...] = (0.6,)
) -> Schedule:
    """AdaSpa's schedule (module docstring, "Schedule"): the shared :class:`Schedule` with a searched
    pattern and no correction."""
    return Schedule(num_steps, warmup, search_at, searched=True)


# --------------------------------------------------------------------------------------------------
# search steps
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchInfo:
    """What a search decided, for logging and tests.

    Attributes:
        recall: fp32 [B, H]: mass kept by the plan over total mass of the searched W (under a cached LSE
            this is measured on the stale-LSE mass).
        density: computed blocks over all blocks of the plan (mean over batch and heads).
        head_density: fp32 [B, H]: the same per head.
        sparsity: fp32 [B, H] sparsity used per head (top-k selection), None for coverage selection.
        base_recall: fp32 [B, H] recall at the base sparsity before the head tiers (head_adaptive only).
    """

    recall: torch.Tensor
    density: float
    head_density: torch.Tensor
    sparsity: torch.Tensor | None = None
    base_recall: torch.Tensor | None = None


def _select(
    W: torch.Tensor,
    *,
    sparsity,
    tau,
    block_q: int,
    block_k: int,
    text_q_blocks,
    text_k_blocks,
    head_adaptive: bool,
) -> tuple[BlockPlan, SearchInfo]:
    if (sparsity is None) == (tau is None):
        raise ValueError("give exactly one of sparsity (top-k selection) or tau (coverage selection)")
    base_recall = used = None
    if tau is not None:
        if head_adaptive:
            raise ValueError("head_adaptive tiers are defined on sparsity; it cannot be combined with tau")
        mask = _coverage_mask(W, tau, text_q_blocks, text_k_blocks)
    elif head_adaptive:
        if isinstance(sparsity, torch.Tensor) and sparsity.numel() != 1:
            raise ValueError("head_adaptive needs one base sparsity (a float), not per-head values")
        base_mask, _ = _topk_mask(W, sparsity, text_q_blocks, text_k_blocks)
        base_recall = head_recall(W, base_mask)
        tiers = head_adaptive_sparsity(base_recall, float(sparsity))
        mask, used = _topk_mask(W, tiers, text_q_blocks, text_k_blocks, trusted=True)
    else:
        mask, used = _topk_mask(W, sparsity, text_q_blocks, text_k_blocks)
    plan = BlockPlan.from_block_mask(mask, block_q, block_k)
    head_density = plan.kv_counts.float().sum(-1) / (plan.num_q_blocks * plan.num_kv_blocks)
    info = SearchInfo(
        recall=head_recall(W, mask),
        density=plan.density(),
        head_density=head_density,
        sparsity=used.float() if used is not None else None,
        base_recall=base_recall,
    )
    return plan, info


def fused_search(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sparsity: float | torch.Tensor | None = None,
    tau: float | torch.Tensor | None = None,
    block_q: int = 128,
    block_k: int = 128,
    text_q_blocks: torch.Tensor | None = None,
    text_k_blocks: torch.Tensor | None = None,
    head_adaptive: bool = False,
    scale: float | None = None,
    kv_len: torch.Tensor | None = None,
    layout: str = "bshd",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, BlockPlan, SearchInfo]:
    """The first sparse step: dense attention with its LSE, then exact block mass -> plan.

    Args:
        q, k, v: as in ``dit_accel.kernels.dense_attention`` (layout "bshd" [B, S, H, D] or "bhsd").
        sparsity: top-k selection at this sparsity (float, [H] or [B, H]); or
        tau: coverage selection at this mass fraction. Exactly one of the two.
        block_q, block_k: plan block sizes (powers of two >= 16 for the Triton backend).
        text_q_blocks, text_k_blocks: bool masks over blocks, see :func:`select_topk`.
        head_adaptive: apply the head tiers of :func:`head_adaptive_sparsity` (float sparsity only).
        scale, kv_len, layout, backend: passed to the kernel ops.

    Returns:
        out: the dense attention output (this step's result), q's layout and dtype.
        lse: fp32 [B, H, S_q], to cache for later cached searches.
        plan: the selected BlockPlan [B, H, ...].
        info: :class:`SearchInfo`.
    """
    out, lse = dense_attention(q, k, v, scale=scale, kv_len=kv_len, layout=layout, backend=backend)
    W = block_mass(q, k, lse, block_q, block_k, scale=scale, kv_len=kv_len, layout=layout, backend=backend)
    plan, info = _select(
        W,
        sparsity=sparsity,
        tau=tau,
        block_q=block_q,
        block_k=block_k,
        text_q_blocks=text_q_blocks,
        text_k_blocks=text_k_blocks,
        head_adaptive=head_adaptive,
    )
    return out, lse, plan, info


def cached_search(
    q: torch.Tensor,
    k: torch.Tensor,
    lse_cached: torch.Tensor,
    *,
    sparsity: float | torch.Tensor | None = None,
    tau: float | torch.Tensor | None = None,
    block_q: int = 128,
    block_k: int = 128,
    text_q_blocks: torch.Tensor | None = None,
    text_k_blocks: torch.Tensor | None = None,
    head_adaptive: bool = False,
    scale: float | None = None,
    kv_len: torch.Tensor | None = None,
    layout: str = "bshd",
    backend: str = "auto",
) -> tuple[BlockPlan, SearchInfo]:
    """A later search: block mass of the current q, k under the LSE cached at the fused search -> plan.

    One QK^T pass and no P.V. With ``head_adaptive`` the tiers are recomputed from this W; to keep the
    tiers of the fused search instead, pass its ``info.sparsity`` as ``sparsity`` with head_adaptive off.

    Args:
        q, k: the current step's q and k (layout as given).
        lse_cached: fp32 [B, H, S_q] from :func:`fused_search`.
        other arguments: as in :func:`fused_search`.

    Returns:
        plan: the new BlockPlan, used from this step on.
        info: :class:`SearchInfo` (recall measured on the stale-LSE mass).
    """
    W = block_mass(
        q, k, lse_cached, block_q, block_k, scale=scale, kv_len=kv_len, layout=layout, backend=backend
    )
    return _select(
        W,
        sparsity=sparsity,
        tau=tau,
        block_q=block_q,
        block_k=block_k,
        text_q_blocks=text_q_blocks,
        text_k_blocks=text_k_blocks,
        head_adaptive=head_adaptive,
    )


# --------------------------------------------------------------------------------------------------
# the pattern and the method
# --------------------------------------------------------------------------------------------------
def _check_fraction(value, name: str, low: float, high: float, closed_low: bool, closed_high: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value >= low if closed_low else value > low) and (
            value <= high if closed_high else value < high
        )
    if not ok:
        lo, hi = "[" if closed_low else "(", "]" if closed_high else ")"
        raise ValueError(f"adaspa {name} must be a number in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


class SearchedPattern(Pattern):
    """AdaSpa's block selection from attention mass: top-k at a sparsity (with head tiers) or coverage.

    Args:
        sparsity: base sparsity s of top-k selection: [0, 1) with head_adaptive, else [0, 1]. Default 0.8
            when ``tau`` is not given.
        tau: coverage selection at this mass fraction in (0, 1] instead of top-k (excludes ``sparsity``).
        head_adaptive: per-head sparsity tiers (top-k only). Default: True with sparsity, False with tau.
    """

    name = "adaspa"
    searched = True

    def __init__(
        self, sparsity: float | None = None, tau: float | None = None, head_adaptive: bool | None = None
    ):
        if sparsity is not None and tau is not None:
            raise ValueError("adaspa takes sparsity (top-k selection) or tau (coverage selection), not both")
        if tau is not None:
            if head_adaptive:
                raise ValueError("adaspa head_adaptive tiers are defined on sparsity; they exclude tau")
            self.tau, self.sparsity, self.head_adaptive = (
                _check_fraction(tau, "tau", 0, 1, False, True),
                None,
                False,
            )
        else:
            self.head_adaptive = True if head_adaptive is None else bool(head_adaptive)
            s = 0.8 if sparsity is None else sparsity
            closed_high = not self.head_adaptive
            self.sparsity, self.tau = _check_fraction(s, "sparsity", 0, 1, True, closed_high), None

    def knobs(self) -> dict:
        return {"sparsity": self.sparsity, "tau": self.tau, "head_adaptive": self.head_adaptive}

    def selection(self, call: AttentionCall, device) -> dict:
        """Keyword arguments of :func:`fused_search` / :func:`cached_search` for this call."""
        bq, bk = call.block_q, call.block_k
        text_q = text_k = None
        if call.text_len > 0 and call.text_position in ("first", "last"):
            first = call.text_position == "first"
            text_q = text_block_mask(call.q_len, bq, call.text_len, text_first=first, device=device)
            text_k = text_block_mask(call.k_len, bk, call.text_len, text_first=first, device=device)
        return {
            "sparsity": self.sparsity,
            "tau": self.tau,
            "block_q": bq,
            "block_k": bk,
            "text_q_blocks": text_q,
            "text_k_blocks": text_k,
            "head_adaptive": self.head_adaptive,
        }

    def search(self, q, k, lse, call: AttentionCall) -> tuple[BlockPlan, SearchInfo]:
        """Block mass of q, k under ``lse`` (fresh from a dense pass, or cached), then the selection."""
        sel = self.selection(call, q.device)
        W = block_mass(
            q,
            k,
            lse,
            sel["block_q"],
            sel["block_k"],
            kv_len=call.kv_len,
            layout=call.layout,
            backend=call.config.backend,
        )
        return _select(W, **sel)


class AdaspaMethod(ComposedMethod):
    """AdaSpa: dense warm-up, a fused search, cached searches, and the latest searched plan in between.

    Calls are labelled in the stats by phase: "dense", "fused_search", "cached_search", "sparse".
    The LSE kept between the fused search and the last cached search goes through the method's state
    ledger (``method.cache``), which :meth:`memory` reports (``lse``, ``plans``, ``peak``, ...).

    Args:
        sparsity, tau, head_adaptive: the selection (:class:`SearchedPattern`).
        warmup: dense warm-up as a fraction of the run's steps (float, rounded half up) or a step count
            (int). None: the config's ``dense_steps`` when set, else 0.2. Giving both is an error.
        search_at: cached-search steps as fractions of the run (float) or step indices (int); () for none.
        max_cache_bytes: bound on the kept LSE over every (context, layer) of a run, in bytes (None: the
            config's ``max_state_bytes``). Over it, LSE is kept in fp16, then not at all for the layers
            that do not fit (their cached searches are skipped; they keep their fused-search plan).
    """

    name = "adaspa"
    default_warmup = DEFAULT_WARMUP

    def __init__(
        self,
        sparsity: float | None = None,
        tau: float | None = None,
        warmup: float | int | None = None,
        search_at: tuple[float | int, ...] | float | int = (0.6,),
        head_adaptive: bool | None = None,
        max_cache_bytes: int | None = None,
    ):
        if max_cache_bytes is not None and (
            isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int) or max_cache_bytes < 0
        ):
            raise ValueError(f"adaspa max_cache_bytes must be None or an int >= 0, got {max_cache_bytes!r}")
        super().__init__(
            SearchedPattern(sparsity, tau, head_adaptive),
            warmup=warmup,
            search_at=search_at,
            max_state_bytes=max_cache_bytes,
        )
        self.max_cache_bytes = max_cache_bytes

    @property
    def sparsity(self) -> float | None:
        return self.pattern.sparsity

    @property
    def tau(self) -> float | None:
        return self.pattern.tau

    @property
    def head_adaptive(self) -> bool:
        return self.pattern.head_adaptive
