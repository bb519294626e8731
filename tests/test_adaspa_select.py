"""AdaSpa selection core: top-k / coverage selection, recall, head tiers, schedule, search steps (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from dit_accel.kernels import BlockPlan, block_mass, dense_attention
from dit_accel.methods.adaspa import (
    AdaspaSchedule,
    cached_search,
    fused_search,
    head_adaptive_sparsity,
    head_recall,
    select_coverage,
    select_topk,
    text_block_mask,
)


# --------------------------------------------------------------------------------------------------
# brute-force oracles (Python loops over rows)
# --------------------------------------------------------------------------------------------------
def _order(row: list[float]) -> list[int]:
    """Heaviest first; equal mass: lower index first."""
    return sorted(range(len(row)), key=lambda c: (-row[c], c))


def _add_text(mask, text_q, text_k):
    if text_k is not None:
        mask[:, :, :, text_k] = True
    if text_q is not None:
        mask[:, :, text_q, :] = True
    return mask


def ref_topk(W, s_bh, text_q=None, text_k=None):
    B, H, nq, nk = W.shape
    mask = torch.zeros(W.shape, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            k = min(max(math.floor((1.0 - float(s_bh[b][h])) * nk + 0.5), 1), nk)
            for p in range(nq):
                for c in _order(W[b, h, p].tolist())[:k]:
                    mask[b, h, p, c] = True
    return _add_text(mask, text_q, text_k)


def ref_coverage(W, tau, text_q=None, text_k=None):
    B, H, nq, nk = W.shape
    mask = torch.zeros(W.shape, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for p in range(nq):
                row = W[b, h, p].double().tolist()
                total = 0.0
                for x in row:
                    total += x
                acc = 0.0
                for m, c in enumerate(_order(row)):
                    if m > 0 and acc >= tau * total:
                        break
                    mask[b, h, p, c] = True
                    acc += row[c]
    return _add_text(mask, text_q, text_k)


def ref_recall(W, mask):
    B, H = W.shape[:2]
    out = torch.empty(B, H, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            total = W[b, h].double().sum().item()
            kept = W[b, h].double()[mask[b, h]].sum().item()
            out[b, h] = kept / total if total > 0 else 1.0
    return out


def ref_tiers(recall, s):
    """The paper's rule with the offset d = min((1 - s) / 2, s), one head at a time."""
    B, H = recall.shape
    out = torch.full((B, H), s, dtype=torch.float64)
    d = min((1 - s) / 2, s)
    for b in range(B):
        r = recall[b].tolist()
        n = min(sum(x > 0.8 for x in r), H // 2)
        ranked = _order(r)
        for h in ranked[:n]:
            out[b, h] = s + d
        for h in ranked[H - n :]:
            out[b, h] = s - d
    return out


def ref_mass(q, k, block_q, block_k, scale, kv_len=None):
    """Exact block mass in float64 from explicit softmax; q, k [B, H, S, D]."""
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    S_q, S_k = s.shape[-2:]
    if kv_len is not None:
        cols = torch.arange(S_k)
        s = s.masked_fill(cols[None, None, None, :] >= kv_len[:, None, None, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    nq, nk = -(-S_q // block_q), -(-S_k // block_k)
    W = torch.zeros(*p.shape[:2], nq, nk, dtype=torch.float64)
    for a in range(nq):
        for c in range(nk):
            rows, cols = slice(a * block_q, (a + 1) * block_q), slice(c * block_k, (c + 1) * block_k)
            W[:, :, a, c] = p[:, :, rows, cols].sum((-2, -1))
    return W


def _bh(s, B, H):
    return [[s] * H for _ in range(B)] if isinstance(s, float) else s.expand(B, H).tolist()


# --------------------------------------------------------------------------------------------------
# top-k selection
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(1, 1, 7, 9), (2, 3, 5, 13)], ids=["1x1x7x9", "2x3x5x13"])
def test_topk_matches_brute_force_random(shape, s):
    g = torch.Generator().manual_seed(0)
    W = torch.rand(shape, generator=g)
    plan = select_topk(W, s, block_q=16, block_k=32)
    assert isinstance(plan, BlockPlan) and (plan.block_q, plan.block_k) == (16, 32)
    assert torch.equal(plan.to_block_mask(), ref_topk(W, _bh(s, *shape[:2])))


def test_topk_hand_example_and_ties():
    # k = round(0.6 * 5) = 3.
    W = torch.tensor([[[[1.0, 3.0, 3.0, 0.0, 3.0], [5.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 2.0, 2.0, 1.0]]]])
    mask = select_topk(W, 0.4, block_q=16, block_k=16).to_block_mask()[0, 0]
    expected = torch.tensor(
        [[False, True, True, False, True], [True, True, True, False, False], [False, True, True, True, False]]
    )
    # Row 1 keeps 0, then the first two of its tied zero blocks; row 2 breaks the tie 1 vs 4 towards 1.
    assert torch.equal(mask, expected)
    mask = select_topk(W, 0.7, block_q=16, block_k=16).to_block_mask()[0, 0]  # k = round(1.5) = 2
    assert mask.sum(-1).tolist() == [2, 2, 2]
    assert mask[0].nonzero().flatten().tolist() == [1, 2]
    assert mask[2].nonzero().flatten().tolist() == [2, 3]


def test_topk_all_ties_deterministic():
    W = torch.ones(2, 2, 4, 10)
    mask = select_topk(W, 0.7, block_q=16, block_k=16).to_block_mask()
    expected = torch.zeros(10, dtype=torch.bool)
    expected[:3] = True
    assert torch.equal(mask, expected.expand(2, 2, 4, 10))


def test_topk_sparsity_zero_keeps_all_and_one_keeps_one():
    W = torch.rand(2, 2, 6, 7, generator=torch.Generator().manual_seed(1))
    full = select_topk(W, 0.0, block_q=16, block_k=16)
    assert full.to_block_mask().all() and full.density() == 1.0
    one = select_topk(W, 1.0, block_q=16, block_k=16)
    assert torch.equal(one.kv_counts, torch.ones(2, 2, 6, dtype=torch.int32))
    assert torch.equal(one.kv_indices[..., 0].long(), W.argmax(-1))


@pytest.mark.parametrize("per", ["H", "BH", "1H"])
def test_topk_per_head_sparsity(per):
    B, H, nq, nk = 2, 4, 5, 12
    W = torch.rand(B, H, nq, nk, generator=torch.Generator().manual_seed(2))
    if per == "H":
        s = torch.tensor([0.0, 0.25, 0.5, 0.9])
    elif per == "BH":
        s = torch.tensor([[0.0, 0.25, 0.5, 0.9], [0.9, 0.8, 0.1, 0.5]])
    else:
        s = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    mask = select_topk(W, s, block_q=16, block_k=16).to_block_mask()
    assert torch.equal(mask, ref_topk(W, _bh(s, B, H)))
    counts = mask.sum(-1)
    for b in range(B):
        for h in range(H):
            k = max(math.floor((1 - float(s.expand(B, H)[b, h])) * nk + 0.5), 1)
            assert (counts[b, h] == k).all()


def test_topk_text_blocks():
    B, H, nq, nk = 2, 2, 6, 6
    W = torch.rand(B, H, nq, nk, generator=torch.Generator().manual_seed(3))
    tq = torch.tensor([True, False, False, False, False, False])
    tk = torch.tensor([True, False, False, False, False, True])
    mask = select_topk(W, 0.8, block_q=16, block_k=16, text_q_blocks=tq, text_k_blocks=tk).to_block_mask()
    assert torch.equal(mask, ref_topk(W, _bh(0.8, B, H), tq, tk))
    assert mask[:, :, 0].all() and mask[..., 0].all() and mask[..., 5].all()
    assert (mask[:, :, 1:].sum(-1) <= 1 + 2).all()


def _banded_qk(B, H, S, D, width):
    """q = k = Fourier features of the position: q_i . k_j peaks at i = j and decays with |i - j|."""
    pos = torch.arange(S, dtype=torch.float32)
    freqs = torch.arange(1, D // 2 + 1, dtype=torch.float32) * (math.pi / (width * D))
    ang = pos[:, None] * freqs[None, :]
    feat = torch.cat([ang.cos(), ang.sin()], -1) * 3.0  # [S, D]
    x = feat.expand(B, H, S, D).contiguous()
    return x, x.clone()


@pytest.mark.parametrize("s", [0.5, 0.7])
def test_topk_structured_banded(s):
    B, H, S, D, blk = 1, 2, 100, 16, 16
    q, k = _banded_qk(B, H, S, D, width=8)
    _, lse = dense_attention(q, k, k, layout="bhsd", backend="torch")
    W = block_mass(q, k, lse, blk, blk, layout="bhsd", backend="torch")
    mask = select_topk(W, s, block_q=blk, block_k=blk).to_block_mask()
    assert torch.equal(mask, ref_topk(W, _bh(s, B, H)))
    # A local pattern keeps its diagonal blocks.
    assert mask.diagonal(dim1=-2, dim2=-1).all()


# --------------------------------------------------------------------------------------------------
# coverage selection and recall
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.05, 0.5, 0.8, 0.95, 1.0])
def test_coverage_matches_brute_force(tau):
    g = torch.Generator().manual_seed(4)
    W = torch.rand(2, 3, 5, 11, generator=g) ** 4  # skewed rows
    W[0, 0, 0] = 0.0  # an empty row keeps one block
    W[1, 2, 1] = torch.tensor([0.0, 2.0, 2.0, 0, 0, 0, 0, 1, 0, 0, 0])  # ties and zeros
    tq = torch.tensor([False, False, False, False, True])
    tk = torch.zeros(11, dtype=torch.bool)
    tk[10] = True
    for text in [(None, None), (tq, tk)]:
        mask = select_coverage(W, tau, block_q=16, block_k=16, text_q_blocks=text[0], text_k_blocks=text[1])
        assert torch.equal(mask.to_block_mask(), ref_coverage(W, tau, *text))
    mask = select_coverage(W, tau, block_q=16, block_k=16).to_block_mask()
    assert mask[0, 0, 0].tolist() == [True] + [False] * 10
    if tau == 1.0:  # every block with mass is kept, and zero blocks are not
        assert torch.equal(mask[0, 1:], W[0, 1:] > 0)


def test_coverage_hand_example():
    # heaviest first: 1, 2, 3, 0 (the tie 2 vs 3 goes to 2); cumulative 5, 7, 9, 10
    W = torch.tensor([[[[1.0, 5.0, 2.0, 2.0]]]])
    taus = (0.4, 0.5, 0.6, 0.85, 0.95)
    got = {t: select_coverage(W, t, block_q=16, block_k=16).to_block_mask()[0, 0, 0].tolist() for t in taus}
    assert got[0.4] == [False, True, False, False]
    assert got[0.5] == [False, True, False, False]
    assert got[0.6] == [False, True, True, False]
    assert got[0.85] == [False, True, True, True]
    assert got[0.95] == [True, True, True, True]


def test_head_recall_hand_made():
    W = torch.tensor(
        [[[[3.0, 1.0], [0.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]]
    )  # [1, 3, 2, 2]
    diag = torch.tensor([[True, False], [False, True]])
    r = head_recall(W, diag.expand(1, 3, 2, 2))
    assert r.dtype == torch.float32 and r.shape == (1, 3)
    assert torch.allclose(r, torch.tensor([[7 / 8, 0.5, 1.0]]))
    plan = BlockPlan.from_block_mask(diag.expand(1, 3, 2, 2), 16, 16)
    assert torch.equal(head_recall(W, plan), r)
    assert torch.allclose(head_recall(W, torch.ones(1, 1, 2, 2, dtype=torch.bool)), torch.ones(1, 3))


def test_head_recall_random_matches_loop():
    g = torch.Generator().manual_seed(5)
    W = torch.rand(2, 4, 6, 6, generator=g)
    mask = torch.rand(2, 4, 6, 6, generator=g) > 0.6
    assert torch.allclose(head_recall(W, mask).double(), ref_recall(W, mask), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# head-adaptive tiers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "recall, s, expected",
    [
        pytest.param([0.9, 0.5, 0.95, 0.85], 0.5, [0.75, 0.25, 0.75, 0.25], id="n-clamped-to-H/2"),
        pytest.param([0.1, 0.9, 0.3, 0.2, 0.4, 0.5], 0.6, [0.4, 0.8, 0.6, 0.6, 0.6, 0.6], id="n=1"),
        pytest.param([0.5, 0.6, 0.7, 0.8], 0.5, [0.5, 0.5, 0.5, 0.5], id="n=0-(0.8-not-above)"),
        pytest.param([0.9, 0.9, 0.9, 0.9], 0.5, [0.75, 0.75, 0.25, 0.25], id="ties-by-head-index"),
        pytest.param([0.99, 0.9, 0.95, 0.85, 0.81], 0.6, [0.8, 0.6, 0.8, 0.4, 0.4], id="odd-H"),
        pytest.param([0.9, 0.9, 0.1, 0.5], 0.2, [0.4, 0.4, 0.0, 0.0], id="s<1/3-offset-shrinks"),
        pytest.param([0.9, 0.1], 0.0, [0.0, 0.0], id="s=0-all-dense"),
        pytest.param([0.9], 0.5, [0.5], id="H=1"),
    ],
)
def test_tiers_hand_cases(recall, s, expected):
    out = head_adaptive_sparsity(torch.tensor([recall]), s)
    assert out.shape == (1, len(recall)) and out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([expected]), atol=1e-6)
    assert abs(out.double().mean().item() - s) < 1e-6
    assert torch.allclose(head_adaptive_sparsity(torch.tensor(recall), s), out[0])


def test_tiers_random_match_rule_and_keep_mean():
    g = torch.Generator().manual_seed(6)
    for s in [0.0, 0.1, 1 / 3, 0.4, 0.5, 0.75, 0.9, 0.99]:
        for H in [1, 2, 5, 8, 24]:
            recall = 0.5 + 0.5 * torch.rand(3, H, generator=g)
            out = head_adaptive_sparsity(recall, s)
            assert torch.allclose(out.double(), ref_tiers(recall, s), atol=1e-6)
            assert torch.allclose(out.double().mean(-1), torch.full((3,), s, dtype=torch.float64), atol=1e-6)
            assert (out >= 0).all() and (out < 1).all()
            n = (recall > 0.8).sum(-1).clamp(max=H // 2)
            assert torch.equal((out > s + 1e-7).sum(-1), n if s > 0 else torch.zeros_like(n))


def test_tiers_per_batch_and_invalid():
    recall = torch.tensor([[0.9, 0.2, 0.3, 0.4], [0.9, 0.95, 0.85, 0.1]])
    out = head_adaptive_sparsity(recall, 0.6)
    assert torch.allclose(out, torch.tensor([[0.8, 0.4, 0.6, 0.6], [0.8, 0.8, 0.4, 0.4]]), atol=1e-6)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            head_adaptive_sparsity(recall, bad)


# --------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------
def _seq(*parts):
    out = []
    for phase, n in parts:
        out += [phase] * n
    return tuple(out)


D, F, C, SP = "dense", "fused_search", "cached_search", "sparse"


@pytest.mark.parametrize(
    "steps, expected",
    [
        (50, _seq((D, 10), (F, 1), (SP, 19), (C, 1), (SP, 19))),
        (30, _seq((D, 6), (F, 1), (SP, 11), (C, 1), (SP, 11))),
        (20, _seq((D, 4), (F, 1), (SP, 7), (C, 1), (SP, 7))),
        (8, _seq((D, 2), (F, 1), (SP, 2), (C, 1), (SP, 2))),
        (3, (D, F, C)),
        (2, (F, C)),
        (1, (D,)),
    ],
)
def test_schedule_defaults(steps, expected):
    sched = AdaspaSchedule(steps)
    assert sched.phases() == expected
    assert tuple(sched.phase(t) for t in range(steps)) == expected


def test_schedule_fifty_steps_indices():
    sched = AdaspaSchedule(50)
    assert (sched.warmup_steps, sched.fused_step, sched.cached_steps) == (10, 10, (30,))
    assert [t for t in range(50) if sched.phase(t) == "dense"] == list(range(10))
    assert [t for t in range(50) if sched.phase(t) == "sparse"] == list(range(11, 30)) + list(range(31, 50))


def test_schedule_absolute_and_edge_searches():
    s = AdaspaSchedule(50, warmup=12, search_at=(35, 20, 20))
    assert (s.fused_step, s.cached_steps) == (12, (20, 35))
    assert s.phase(11) == D and s.phase(12) == F and s.phase(20) == C and s.phase(21) == SP
    assert AdaspaSchedule(50, search_at=()).phases() == _seq((D, 10), (F, 1), (SP, 39))
    # searches at or before the fused search, or past the end, are dropped
    assert AdaspaSchedule(50, search_at=(0.1, 10, 50, 0.2)).cached_steps == ()
    assert AdaspaSchedule(50, warmup=0).phases() == _seq((F, 1), (SP, 29), (C, 1), (SP, 19))
    assert AdaspaSchedule(50, search_at=(0.4, 0.8)).cached_steps == (20, 40)
    assert AdaspaSchedule(50, search_at=[0.6]).search_at == (0.6,)


def test_schedule_no_room_for_search_is_dense():
    assert AdaspaSchedule(10, warmup=1.0).phases() == (D,) * 10
    assert AdaspaSchedule(10, warmup=9).phases() == (D,) * 10  # a search on the last step is never used
    assert AdaspaSchedule(10, warmup=8).phases() == (D,) * 8 + (F, SP)
    assert AdaspaSchedule(10, warmup=40).fused_step is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_steps=0),
        dict(num_steps=2.0),
        dict(num_steps=10, warmup=-1),
        dict(num_steps=10, warmup=1.5),
        dict(num_steps=10, warmup=True),
        dict(num_steps=10, search_at=(-0.1,)),
        dict(num_steps=10, search_at=("3",)),
    ],
)
def test_schedule_invalid(kwargs):
    with pytest.raises(ValueError):
        AdaspaSchedule(**kwargs)


def test_schedule_step_out_of_range():
    sched = AdaspaSchedule(8)
    for bad in (-1, 8):
        with pytest.raises(ValueError):
            sched.phase(bad)


# --------------------------------------------------------------------------------------------------
# text masks
# --------------------------------------------------------------------------------------------------
def test_text_block_mask():
    assert text_block_mask(75, 16, 20, text_first=True).tolist() == [True, True, False, False, False]
    assert text_block_mask(75, 16, 16, text_first=True).tolist() == [True, False, False, False, False]
    assert text_block_mask(75, 16, 20, text_first=False).tolist() == [False, False, False, True, True]
    assert text_block_mask(75, 16, 11, text_first=False).tolist() == [False, False, False, False, True]
    assert not text_block_mask(75, 16, 0, text_first=True).any()
    with pytest.raises(ValueError):
        text_block_mask(75, 16, 76, text_first=True)


def test_bad_text_mask_and_sparsity_rejected():
    W = torch.rand(1, 2, 3, 4)
    with pytest.raises(ValueError):
        select_topk(W, 0.5, block_q=16, block_k=16, text_k_blocks=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError):
        select_topk(W, 0.5, block_q=16, block_k=16, text_q_blocks=torch.ones(3))
    with pytest.raises(ValueError):
        select_topk(W, 1.5, block_q=16, block_k=16)
    with pytest.raises(ValueError):
        select_topk(W, torch.tensor([0.5, 0.5, 0.5]), block_q=16, block_k=16)
    with pytest.raises(ValueError):
        select_coverage(W, 0.0, block_q=16, block_k=16)


# --------------------------------------------------------------------------------------------------
# search steps
# --------------------------------------------------------------------------------------------------
def _qkv(B, S, H, Dh, seed, layout, local_heads=()):
    """Random q, k, v; the heads in ``local_heads`` get banded (local) q, k so their mass concentrates."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, Dh, generator=g) for _ in range(3))
    if local_heads:
        band, _ = _banded_qk(B, len(local_heads), S, Dh, width=2)
        idx = list(local_heads)
        q[:, idx] = band + 0.1 * q[:, idx]
        k[:, idx] = band + 0.1 * k[:, idx]
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return q, k, v


def _bhsd(x, layout):
    return x.transpose(1, 2) if layout == "bshd" else x


@pytest.mark.parametrize(
    "layout, kv_len, text",
    [
        pytest.param("bshd", None, False, id="bshd"),
        pytest.param("bhsd", None, True, id="bhsd-text"),
        pytest.param("bshd", [70, 45], False, id="bshd-kvlen"),
    ],
)
@pytest.mark.parametrize("head_adaptive", [False, True], ids=["flat", "tiers"])
def test_fused_search_matches_dense_and_brute_force(layout, kv_len, text, head_adaptive):
    B, S, H, Dh, blk, s = 2, 75, 4, 16, 16, 0.6
    # heads 0 and 2 local (recall > 0.8), 1 and 3 diffuse, so the tiers have work to do
    q, k, v = _qkv(B, S, H, Dh, seed=7, layout=layout, local_heads=(0, 2))
    kvl = torch.tensor(kv_len, dtype=torch.int32) if kv_len is not None else None
    tq = text_block_mask(S, blk, 20, text_first=True) if text else None
    tk = text_block_mask(S, blk, 20, text_first=True) if text else None
    out, lse, plan, info = fused_search(
        q,
        k,
        v,
        sparsity=s,
        block_q=blk,
        block_k=blk,
        text_q_blocks=tq,
        text_k_blocks=tk,
        head_adaptive=head_adaptive,
        kv_len=kvl,
        layout=layout,
        backend="torch",
    )
    ref_out, ref_lse = dense_attention(q, k, v, kv_len=kvl, layout=layout, backend="torch")
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    # and dense attention itself against explicit float64 softmax
    scale = 1 / math.sqrt(Dh)
    qh, kh, vh = (_bhsd(x, layout).double() for x in (q, k, v))
    sc = qh @ kh.transpose(-1, -2) * scale
    if kvl is not None:
        sc = sc.masked_fill(torch.arange(S)[None, None, None, :] >= kvl[:, None, None, None], float("-inf"))
    assert torch.allclose(_bhsd(out, layout).double(), torch.softmax(sc, -1) @ vh, atol=1e-5)
    assert torch.allclose(lse.double(), torch.logsumexp(sc, -1), atol=1e-5)

    W = ref_mass(qh, kh, blk, blk, scale, kvl)
    if head_adaptive:
        base = ref_topk(W, _bh(s, B, H), tq, tk)
        base_recall = ref_recall(W, base)
        assert torch.allclose(info.base_recall.double(), base_recall, atol=1e-5)
        s_used = ref_tiers(base_recall, s)
        assert torch.allclose(info.sparsity.double(), s_used, atol=1e-6)
        assert not torch.allclose(s_used, torch.full_like(s_used, s))  # the tiers did something here
        expected = ref_topk(W, s_used.tolist(), tq, tk)
    else:
        expected = ref_topk(W, _bh(s, B, H), tq, tk)
        assert torch.allclose(info.sparsity, torch.full((B, H), s))
    assert torch.equal(plan.to_block_mask(), expected)
    assert (plan.block_q, plan.block_k, plan.batch, plan.heads) == (blk, blk, B, H)
    assert torch.allclose(info.recall.double(), ref_recall(W, expected), atol=1e-5)
    assert info.density == pytest.approx(expected.float().mean().item())
    assert torch.allclose(info.head_density, expected.float().mean((-2, -1)))


def test_fused_search_coverage():
    B, S, H, Dh, blk, tau = 1, 100, 2, 16, 16, 0.7
    q, k, v = _qkv(B, S, H, Dh, seed=8, layout="bshd")
    q = q * 2.0
    out, lse, plan, info = fused_search(q, k, v, tau=tau, block_q=blk, block_k=blk, backend="torch")
    W = ref_mass(_bhsd(q, "bshd"), _bhsd(k, "bshd"), blk, blk, 1 / math.sqrt(Dh))
    expected = ref_coverage(W, tau)
    assert torch.equal(plan.to_block_mask(), expected)
    assert info.sparsity is None and (info.recall >= tau - 1e-5).all()
    with pytest.raises(ValueError):
        fused_search(q, k, v, tau=tau, head_adaptive=True, block_q=blk, block_k=blk, backend="torch")
    with pytest.raises(ValueError):
        fused_search(q, k, v, sparsity=0.5, tau=tau, block_q=blk, block_k=blk, backend="torch")
    with pytest.raises(ValueError):
        fused_search(q, k, v, block_q=blk, block_k=blk, backend="torch")


def test_cached_search_uses_the_stale_lse():
    """A stale LSE reweights the query rows inside a block, which changes the selection."""
    B, S, H, Dh, blk, s = 1, 64, 2, 16, 16, 0.75  # 4 x 4 blocks, k = 1
    q, k, v = _qkv(B, S, H, Dh, seed=9, layout="bshd")
    q = q * 2.0
    _, fresh_lse = dense_attention(q, k, v, backend="torch")
    g = torch.Generator().manual_seed(10)
    stale_lse = fresh_lse + 4.0 * torch.randn(fresh_lse.shape, generator=g)

    qh, kh = _bhsd(q, "bshd").double(), _bhsd(k, "bshd").double()
    sc = qh @ kh.transpose(-1, -2) / math.sqrt(Dh)
    p_stale = torch.exp(sc - stale_lse.double()[..., None])
    W_stale = p_stale.view(B, H, 4, blk, 4, blk).sum((3, 5))
    W_fresh = ref_mass(qh, kh, blk, blk, 1 / math.sqrt(Dh))
    stale_sel = ref_topk(W_stale, _bh(s, B, H))
    fresh_sel = ref_topk(W_fresh, _bh(s, B, H))
    assert not torch.equal(stale_sel, fresh_sel)  # the construction separates the two

    plan, info = cached_search(q, k, stale_lse, sparsity=s, block_q=blk, block_k=blk, backend="torch")
    assert torch.equal(plan.to_block_mask(), stale_sel)
    assert torch.allclose(info.recall.double(), ref_recall(W_stale, stale_sel), atol=1e-5)
    # with the fresh LSE the cached search reproduces the fused search
    plan_f, _ = cached_search(q, k, fresh_lse, sparsity=s, block_q=blk, block_k=blk, backend="torch")
    _, _, plan_fused, _ = fused_search(q, k, v, sparsity=s, block_q=blk, block_k=blk, backend="torch")
    assert torch.equal(plan_f.to_block_mask(), fresh_sel)
    assert torch.equal(plan_fused.to_block_mask(), fresh_sel)


def test_cached_search_new_qk_changes_plan_and_keeps_tiers_when_given():
    B, S, H, Dh, blk = 1, 80, 4, 16, 16
    q, k, v = _qkv(B, S, H, Dh, seed=11, layout="bhsd")
    q = q * 2.0
    _, lse, plan0, info0 = fused_search(
        q, k, v, sparsity=0.6, head_adaptive=True, block_q=blk, block_k=blk, layout="bhsd", backend="torch"
    )
    q2, k2, _ = _qkv(B, S, H, Dh, seed=12, layout="bhsd")
    q2 = q2 * 2.0
    plan1, info1 = cached_search(
        q2, k2, lse, sparsity=info0.sparsity, block_q=blk, block_k=blk, layout="bhsd", backend="torch"
    )
    W = block_mass(q2, k2, lse, blk, blk, layout="bhsd", backend="torch")
    expected = ref_topk(W, info0.sparsity.double().tolist())
    assert torch.equal(plan1.to_block_mask(), expected)
    assert not torch.equal(plan1.to_block_mask(), plan0.to_block_mask())
    assert torch.equal(info1.sparsity, info0.sparsity)


def test_selection_reads_back_two_numbers_only():
    """A search runs in the denoising loop: apart from the plan's width (memory) and its density (stats), the
    selection keeps its decisions on the device (each read-back stalls the host until the GPU catches up)."""
    from torch.profiler import ProfilerActivity, profile

    from dit_accel.methods.adaspa import _select

    W = torch.rand(2, 6, 9, 11, generator=torch.Generator().manual_seed(0))
    for kw in ({"sparsity": 0.8, "tau": None, "head_adaptive": True}, {"sparsity": None, "tau": 0.9}):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _select(
                W,
                block_q=16,
                block_k=16,
                text_q_blocks=None,
                text_k_blocks=None,
                **{"head_adaptive": False, **kw},
            )
        reads = sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")
        assert reads == 2, (kw, reads)
