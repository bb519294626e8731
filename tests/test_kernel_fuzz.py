"""Fuzz of BlockPlan and the public kernel ops: random valid plans and inputs against an independent fp64
oracle (many cases on the torch reference, a few tiny ones through the Triton kernels), random invalid plans
and kv_len values that must raise, never return."""

import math
import os
import random

import pytest
import torch

from dit_accel.kernels import BlockPlan, block_mass, block_sparse_attention, dense_attention
from dit_accel.kernels.plan import num_blocks

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_plan_parts(rng: random.Random, n_qb: int, n_kb: int, batch: int, heads: int):
    """Random sorted key-block lists (some rows empty, some full) with garbage padding past the counts."""
    b, h = rng.choice([1, batch]), rng.choice([1, heads])
    max_k = rng.randint(1, n_kb + 2)
    idx = torch.empty(b, h, n_qb, max_k, dtype=torch.int32)
    counts = torch.empty(b, h, n_qb, dtype=torch.int32)
    mask = torch.zeros(b, h, n_qb, n_kb, dtype=torch.bool)
    for i in range(b):
        for j in range(h):
            for p in range(n_qb):
                c = rng.choice([0, min(max_k, n_kb), rng.randint(0, min(max_k, n_kb))])
                keep = sorted(rng.sample(range(n_kb), c))
                pad = [rng.randint(-5, n_kb + 5) for _ in range(max_k - c)]
                idx[i, j, p] = torch.tensor(keep + pad, dtype=torch.int32)
                counts[i, j, p] = c
                mask[i, j, p, keep] = True
    return idx, counts, mask


def _oracle(q, k, v, block_mask, block_q, block_k, scale, kv_len):
    """fp64 masked softmax attention on (B, H, S, D); rows with no key give 0 and -inf."""
    q_len, k_len = q.shape[2], k.shape[2]
    rows = torch.arange(q_len) // block_q
    cols = torch.arange(k_len) // block_k
    keep = block_mask[:, :, rows][:, :, :, cols]
    if kv_len is not None:
        keep = keep & (torch.arange(k_len)[None, :] < kv_len[:, None])[:, None, None, :]
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(p, v.double()), lse


def _case(rng: random.Random, dtype, max_len=80):
    batch, heads = rng.randint(1, 2), rng.randint(1, 3)
    d = rng.choice([16, 24, 32])
    q_len, k_len = rng.randint(1, max_len), rng.randint(1, max_len)
    block_q, block_k = rng.choice([16, 32]), rng.choice([16, 32])
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    q = torch.randn(batch, q_len, heads, d, generator=g).to(dtype)
    k = torch.randn(batch, k_len, heads, d, generator=g).to(dtype)
    v = torch.randn(batch, k_len, heads, d, generator=g).to(dtype)
    kv_len = None
    if rng.random() < 0.4:
        kv_len = torch.tensor([rng.randint(0, k_len + 10) for _ in range(batch)], dtype=torch.int32)
    return q, k, v, block_q, block_k, kv_len


def _check_against_oracle(rng, dtype, backend, atol, device="cpu"):
    q, k, v, block_q, block_k, kv_len = _case(rng, dtype, max_len=80 if backend == "torch" else 40)
    batch, q_len, heads, d = q.shape
    n_qb, n_kb = num_blocks(q_len, block_q), num_blocks(k.shape[1], block_k)
    idx, counts, mask = _random_plan_parts(rng, n_qb, n_kb, batch, heads)
    plan = BlockPlan(block_q, block_k, idx, counts, n_kb)
    assert plan.density() == pytest.approx(mask.float().mean().item())
    assert torch.equal(plan.to_block_mask(), mask)
    assert torch.equal(BlockPlan.from_block_mask(mask, block_q, block_k).to_block_mask(), mask)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    full = mask.expand(batch, heads, -1, -1)
    clamped = kv_len.clamp(max=k.shape[1]) if kv_len is not None else None
    want, want_lse = _oracle(qh, kh, vh, full, block_q, block_k, 1 / math.sqrt(d), clamped)
    dq, dk, dv = (t.to(device) for t in (q, k, v))
    dkv = kv_len.to(device) if kv_len is not None else None
    out, lse = block_sparse_attention(dq, dk, dv, plan.to(device), kv_len=dkv, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    torch.testing.assert_close(out.transpose(1, 2).double(), want, atol=atol, rtol=atol)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], atol=atol, rtol=atol)
    assert torch.equal(out.transpose(1, 2)[~finite], torch.zeros_like(out.transpose(1, 2)[~finite]))

    dense, _ = dense_attention(dq, dk, dv, kv_len=dkv, backend=backend)
    dense = dense.cpu()
    all_blocks = torch.ones(batch, heads, n_qb, n_kb, dtype=torch.bool)
    want_dense, want_dense_lse = _oracle(qh, kh, vh, all_blocks, block_q, block_k, 1 / math.sqrt(d), clamped)
    torch.testing.assert_close(dense.transpose(1, 2).double(), want_dense, atol=atol, rtol=atol)

    # Block mass under the dense LSE: each row's blocks sum to 1 over its valid keys.
    lse32 = want_dense_lse.float()
    w = block_mass(dq, dk, lse32.to(device), block_q, block_k, kv_len=dkv, backend=backend).cpu()
    s = torch.matmul(qh.double(), kh.double().transpose(-1, -2)) / math.sqrt(d)
    p = torch.exp(s - torch.where(torch.isinf(want_dense_lse), 0.0, want_dense_lse)[..., None])
    valid = torch.isfinite(want_dense_lse)[..., None]
    if clamped is not None:
        valid = valid & (torch.arange(k.shape[1])[None, :] < clamped[:, None])[:, None, None, :]
    p = torch.where(valid, p, 0.0)
    p = torch.nn.functional.pad(p, (0, n_kb * block_k - k.shape[1], 0, n_qb * block_q - q_len))
    want_w = p.view(batch, heads, n_qb, block_q, n_kb, block_k).sum((3, 5))
    torch.testing.assert_close(w.double(), want_w, atol=atol * block_q, rtol=atol)


def test_random_valid_plans_on_the_reference():
    rng = random.Random(18)
    for _ in range(60):
        _check_against_oracle(rng, torch.float32, "torch", atol=1e-4)


@pytest.mark.skipif(not TRITON, reason="needs CUDA or TRITON_INTERPRET=1")
def test_random_valid_plans_on_triton():
    rng = random.Random(1818)
    dtype = torch.float16
    for _ in range(6):
        _check_against_oracle(rng, dtype, "triton", atol=2e-2, device=DEVICE)


def _corruptions(rng: random.Random):
    """(name, build) pairs: each builds arguments for BlockPlan that violate exactly one rule."""
    n_kb = 4

    def base():
        idx = torch.tensor([[[[0, 2, 3], [1, 0, 0]]]], dtype=torch.int32)
        counts = torch.tensor([[[3, 1]]], dtype=torch.int32)
        return [16, 16, idx, counts, n_kb]

    def swap(a):
        a[2][0, 0, 0, :2] = torch.tensor([2, 0], dtype=torch.int32)
        return a

    def dup(a):
        a[2][0, 0, 0, 1] = 0
        return a

    def high(a):
        a[2][0, 0, 0, 2] = n_kb + rng.randint(0, 5)
        return a

    def neg(a):
        a[2][0, 0, 1, 0] = -rng.randint(1, 5)
        return a

    def count_high(a):
        a[3][0, 0, 1] = 3 + rng.randint(1, 4)
        return a

    def count_neg(a):
        a[3][0, 0, 0] = -rng.randint(1, 4)
        return a

    def block_float(a):
        a[rng.randint(0, 1)] = 16.0
        return a

    def block_bool(a):
        a[rng.randint(0, 1)] = True
        return a

    def block_nonpositive(a):
        a[rng.randint(0, 1)] = -rng.randint(0, 16)
        return a

    def num_kv_bad(a):
        a[4] = rng.choice([-1, 2.5, "4", None])
        return a

    def dtype_bad(a):
        a[rng.randint(2, 3)] = a[2 if rng.random() < 0.5 else 3].long()
        return a

    def shape_bad(a):
        a[3] = a[3][..., :1]
        return a

    def not_tensor(a):
        a[2] = a[2].tolist()
        return a

    return [
        (f.__name__, (lambda f=f: f(base())))
        for f in (
            swap,
            dup,
            high,
            neg,
            count_high,
            count_neg,
            block_float,
            block_bool,
            block_nonpositive,
            num_kv_bad,
            dtype_bad,
            shape_bad,
            not_tensor,
        )
    ]


def test_random_invalid_plans_raise():
    rng = random.Random(7)
    cases = _corruptions(rng)
    for _ in range(80):
        name, build = rng.choice(cases)
        args = build()
        with pytest.raises(ValueError):
            BlockPlan(*args)
            pytest.fail(f"BlockPlan accepted a plan with {name}: {args}")


def test_plans_that_do_not_fit_the_call_raise():
    rng = random.Random(9)
    q = torch.randn(2, 40, 2, 16)
    for _ in range(30):
        q_len = rng.choice([40, 17, 80])
        k_len = rng.choice([40, 23, 90])
        b, h = rng.choice([(1, 1), (2, 2), (3, 1), (1, 4)])
        plan = BlockPlan.dense(q_len, k_len, 16, 16).expand(b, h)
        fits = q_len == 40 and k_len == 40 and b in (1, 2) and h in (1, 2)
        if fits:
            block_sparse_attention(q, q, q, plan, backend="torch")
        else:
            with pytest.raises(ValueError):
                block_sparse_attention(q, q, q, plan, backend="torch")


def test_random_invalid_kv_len_raises():
    rng = random.Random(11)
    q = torch.randn(2, 30, 2, 16)
    plan = BlockPlan.dense(30, 30, 16, 16)
    makers = [
        lambda: torch.tensor([rng.randint(0, 30), -rng.randint(1, 100)]),
        lambda: -rng.randint(1, 100),
        lambda: [rng.randint(0, 30), -1],
        lambda: torch.tensor([True, False]),
        lambda: torch.rand(2),
        lambda: torch.tensor([1, 2, 3])[: rng.choice([1, 3])],
        lambda: [1.5, 2],
        lambda: "30",
    ]
    for _ in range(40):
        kv_len = rng.choice(makers)()
        for op in (
            lambda n: block_sparse_attention(q, q, q, plan, kv_len=n, backend="torch"),
            lambda n: dense_attention(q, q, q, kv_len=n, backend="torch"),
            lambda n: block_mass(q, q, torch.zeros(2, 2, 30), 16, 16, kv_len=n, backend="torch"),
        ):
            with pytest.raises(ValueError, match="kv_len"):
                op(kv_len)
