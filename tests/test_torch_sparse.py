"""The CPU fast path of ``backend="torch"`` (``kernels/torch_sparse.py``) against the fp32 references, on ugly
shapes: sequence tails, per-batch kv_len (0 included), empty and full rows, broadcast plans, garbage past a
row's count, non-power-of-two head dims, half-precision and strided inputs; and when it is not taken."""

from __future__ import annotations

import pytest
import torch

from dit_accel.kernels import (
    BlockPlan,
    block_mass,
    block_sparse_attention,
    dense_attention,
    ops,
    reference,
    refresh_attention,
    torch_sparse,
)


def _qkv(b, h, s_q, s_k, d, dtype=torch.float32, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # (B, S, H, D) storage read as (B, H, S, D) views, as diffusers' layout gives them
        return tuple(torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2) for s in (s_q, s_k, s_k))
    return tuple(torch.randn(b, h, s, d, generator=g).to(dtype) for s in (s_q, s_k, s_k))


def _plan(b, h, s_q, s_k, block_q, block_k, density, seed=0, garbage=False):
    g = torch.Generator().manual_seed(seed)
    n_qb, n_kb = -(-s_q // block_q), -(-s_k // block_k)
    mask = torch.rand(b, h, n_qb, n_kb, generator=g) < density
    mask[0, 0, 0] = False  # an empty row
    mask[-1, -1, -1] = True  # a full row
    plan = BlockPlan.from_block_mask(mask, block_q, block_k)
    if garbage:  # entries past a row's count are ignored, whatever they hold
        idx = plan.kv_indices.clone()
        past = torch.arange(plan.max_k) >= plan.kv_counts.unsqueeze(-1)
        idx[past] = 10_000
        plan = BlockPlan(block_q, block_k, idx, plan.kv_counts, plan.num_kv_blocks)
    return plan


def _close(got, lse, ref, ref_lse, atol=2e-5):
    torch.testing.assert_close(got.float(), ref.float(), atol=atol, rtol=1e-4)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-5, rtol=1e-5)


CASES = [
    # b, h, s_q, s_k, d, block_q, block_k, density, kv_len, broadcast, garbage
    (2, 3, 70, 70, 32, 16, 16, 0.3, None, False, False),
    (2, 3, 70, 70, 32, 16, 16, 0.3, [70, 33], False, True),
    (1, 2, 100, 83, 72, 32, 16, 0.5, [0], True, False),
    (2, 2, 129, 130, 80, 64, 32, 0.2, [1, 130], True, True),
    (1, 4, 48, 48, 64, 16, 16, 1.0, None, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_sparse_and_dense_match_the_reference(case):
    b, h, s_q, s_k, d, block_q, block_k, density, kv_len, broadcast, garbage = case
    q, k, v = _qkv(b, h, s_q, s_k, d, seed=b + h + s_q)
    pb, ph = (1, 1) if broadcast else (b, h)
    plan = _plan(pb, ph, s_q, s_k, block_q, block_k, density, seed=3, garbage=garbage)
    kv = torch.tensor(kv_len, dtype=torch.int32) if kv_len is not None else None
    scale = d**-0.5
    _close(
        *torch_sparse.sparse_attention(q, k, v, plan, scale, kv),
        *reference.attention_reference(q, k, v, plan, scale, kv),
    )
    _close(
        *torch_sparse.dense_attention(q, k, v, scale, kv),
        *reference.attention_reference(q, k, v, None, scale, kv),
    )


def test_a_plan_chunked_over_query_blocks_matches(monkeypatch):
    """With a tiny chunk the gathered path runs one query block at a time: same result."""
    q, k, v = _qkv(1, 2, 90, 90, 16, seed=4)
    plan = _plan(1, 2, 90, 90, 16, 16, 0.4, seed=5)
    whole = torch_sparse.sparse_attention(q, k, v, plan, 0.25)
    monkeypatch.setattr(torch_sparse, "_CHUNK_ELEMENTS", 1)
    chunked = torch_sparse.sparse_attention(q, k, v, plan, 0.25)
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked[1], whole[1], atol=1e-6, rtol=0)


def test_the_gather_workspace_is_reused_grown_and_private_to_each_thread():
    """Gathers land in a per-thread buffer: a second call of one shape reuses it, a bigger one grows it, and
    calls running at once on two threads (each its own buffer) still match the reference."""
    import threading

    small = (_qkv(1, 2, 90, 90, 16, seed=10), _plan(1, 2, 90, 90, 16, 16, 0.4, seed=11))
    big = (_qkv(2, 3, 200, 200, 32, seed=12), _plan(2, 3, 200, 200, 16, 16, 0.6, seed=13))
    expected = [reference.attention_reference(*qkv, plan, 0.25) for qkv, plan in (small, big)]
    torch_sparse._workspace.__dict__.clear()
    _close(*torch_sparse.sparse_attention(*small[0], small[1], 0.25), *expected[0])
    buf = torch_sparse._workspace.k
    _close(*torch_sparse.sparse_attention(*small[0], small[1], 0.25), *expected[0])
    assert torch_sparse._workspace.k is buf
    _close(*torch_sparse.sparse_attention(*big[0], big[1], 0.25), *expected[1])
    assert torch_sparse._workspace.k.numel() > buf.numel()

    results, buffers = {}, {}

    def work(i):
        qkv, plan = (small, big)[i % 2]
        for _ in range(3):
            results[i] = torch_sparse.sparse_attention(*qkv, plan, 0.25)
        buffers[i] = torch_sparse._workspace.k

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (out, lse) in results.items():
        _close(out, lse, *expected[i % 2])
    assert len({id(b) for b in buffers.values()}) == 4


@pytest.mark.parametrize("first_inference", [True, False], ids=["inference-first", "plain-first"])
def test_the_gather_workspace_serves_inference_mode_and_plain_calls_in_either_order(first_inference):
    """A buffer made inside ``torch.inference_mode`` (diffusers' pipelines run there) is still written by a
    later call outside it, and the other way round."""
    (q, k, v), plan = _qkv(1, 2, 90, 90, 16, seed=14), _plan(1, 2, 90, 90, 16, 16, 0.4, seed=15)
    expected = reference.attention_reference(q, k, v, plan, 0.25)
    torch_sparse._workspace.__dict__.clear()
    for inference in (first_inference, not first_inference, first_inference):
        with torch.inference_mode(inference):
            _close(*torch_sparse.sparse_attention(q, k, v, plan, 0.25), *expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_torch_backend_takes_the_fast_path_for_half_and_strided_inputs(dtype, monkeypatch):
    """``backend="torch"`` on the CPU without grad: the fast path, in q's layout and dtype, within the
    reference's own rounding to that dtype."""
    calls = []
    fast = torch_sparse.sparse_attention
    monkeypatch.setattr(torch_sparse, "sparse_attention", lambda *a, **kw: calls.append(1) or fast(*a, **kw))
    q, k, v = _qkv(2, 3, 75, 75, 40, dtype=dtype, seed=8, strided=True)
    plan = _plan(2, 3, 75, 75, 16, 16, 0.35, seed=9)
    kv = torch.tensor([75, 40], dtype=torch.int32)
    out, lse = block_sparse_attention(q, k, v, plan, kv_len=kv, layout="bhsd", backend="torch")
    ref, ref_lse = reference.attention_reference(q, k, v, plan, 40**-0.5, kv)
    assert calls and out.dtype == dtype and out.shape == q.shape
    _close(out, lse, ref, ref_lse, atol=1e-2)


@pytest.mark.parametrize("rdtype", [torch.float32, torch.float8_e4m3fn])
def test_refresh_and_corrected_steps_match_the_references(rdtype):
    q, k, v = _qkv(2, 2, 66, 66, 32, seed=11)
    plan = _plan(2, 2, 66, 66, 16, 16, 0.3, seed=12)
    kv = torch.tensor([66, 50], dtype=torch.int32)
    out, lse, corr = refresh_attention(q, k, v, plan, kv_len=kv, layout="bhsd", residual_dtype=rdtype,
                                       backend="torch")  # fmt: skip
    r_out, r_lse, r_rho, r_res, r_scale = reference.refresh_reference(q, k, v, plan, 32**-0.5, kv, rdtype)
    _close(out, lse, r_out, r_lse)
    torch.testing.assert_close(corr.rho, r_rho, atol=2e-5, rtol=1e-4)
    res_tol = 0.07 if rdtype == torch.float8_e4m3fn else 2e-5  # one fp8 step of the largest element
    residual = reference.dequantize_residual(corr.residual, corr.residual_scale)
    torch.testing.assert_close(residual, reference.dequantize_residual(r_res, r_scale), atol=res_tol, rtol=0)

    q2, k2, v2 = _qkv(2, 2, 66, 66, 32, seed=13)
    offset = torch.tensor([0.05])
    got, got_lse = block_sparse_attention(q2, k2, v2, plan, kv_len=kv, layout="bhsd", correction=corr,
                                          rho_offset=offset, backend="torch")  # fmt: skip
    want, want_lse = reference.corrected_reference(q2, k2, v2, plan, 32**-0.5, corr.rho, corr.residual,
                                                   corr.residual_scale, kv, offset)  # fmt: skip
    _close(got, got_lse, want, want_lse)


def test_dense_attention_torch_backend_on_the_cpu_uses_the_flash_kernel(monkeypatch):
    calls = []
    fast = torch_sparse.dense_attention
    monkeypatch.setattr(torch_sparse, "dense_attention", lambda *a, **kw: calls.append(1) or fast(*a, **kw))
    q, k, v = _qkv(2, 2, 50, 61, 24, seed=14)
    kv = torch.tensor([0, 37], dtype=torch.int32)
    out, lse = dense_attention(q, k, v, kv_len=kv, layout="bhsd", backend="torch")
    _close(out, lse, *reference.attention_reference(q, k, v, None, 24**-0.5, kv))
    assert calls and (out[0] == 0).all() and torch.isinf(lse[0]).all()


def test_gradients_and_compiled_calls_keep_the_reference(monkeypatch):
    """The fast path has no exact-gradient contract and reads tensors on the host: a call that wants grad
    (or one being traced by torch.compile) runs the reference, whose gradients are exact."""
    monkeypatch.setattr(torch_sparse, "sparse_attention", lambda *a, **kw: pytest.fail("fast path taken"))
    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, 40, 40, 16, seed=15))
    plan = _plan(1, 2, 40, 40, 16, 16, 0.5, seed=16)
    out, _ = block_sparse_attention(q, k, v, plan, layout="bhsd", backend="torch")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not torch_sparse.available(q.detach(), k.detach(), v.detach())
    assert ops.torch_sparse is torch_sparse


def test_a_plan_keeping_every_block_runs_dense():
    q, k, v = _qkv(1, 2, 40, 40, 16, seed=17)
    full = BlockPlan.from_block_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16, 16)
    out, lse = torch_sparse.sparse_attention(q, k, v, full, 0.25)
    dense, dense_lse = torch_sparse.dense_attention(q, k, v, 0.25)
    assert torch.equal(out, dense) and torch.equal(lse, dense_lse)
    _close(out, lse, *reference.attention_reference(q, k, v, full, 0.25))


@pytest.mark.parametrize("chunk", [None, 1])
def test_block_mass_matches_the_reference(chunk, monkeypatch):
    """Tails on both sides, a per-batch kv_len (0 included), rows whose lse is -inf; and chunked one query
    block at a time."""
    if chunk is not None:
        monkeypatch.setattr(torch_sparse, "_MASS_CHUNK_ELEMENTS", chunk)
    q, k, _ = _qkv(3, 2, 77, 90, 24, seed=18)
    kv = torch.tensor([90, 0, 41], dtype=torch.int32)
    _, lse = reference.attention_reference(q, k, k, None, 24**-0.5, kv)
    lse[0, 1, 5:9] = float("-inf")
    assert torch.isinf(lse[1]).all()
    for bq, bk in ((16, 16), (32, 64)):
        got = block_mass(q, k, lse, bq, bk, kv_len=kv, layout="bhsd", backend="torch")
        want = reference.block_mass_reference(q, k, lse, bq, bk, 24**-0.5, kv)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got[1] == 0).all()
