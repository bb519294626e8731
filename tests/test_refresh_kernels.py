"""Re-ttention's kernels: the refresh pass (dense output plus in-mask statistics in one pass over the keys)
and the corrected sparse pass, against the fp32 torch oracle on awkward shapes."""

import pytest
import torch
from test_kernels import DEVICE, _assert_close, _assert_lse, _bhsd, _eager_lowp, _qkv, _random_plan

from dit_accel.kernels import (
    BlockPlan,
    SoftmaxCorrection,
    block_sparse_attention,
    dense_attention,
    mask_statistics,
    refresh_attention,
)
from dit_accel.kernels.reference import (
    attention_reference,
    corrected_reference,
    dequantize_residual,
    refresh_reference,
    refresh_statistics,
)

FP8 = torch.float8_e4m3fn


def _residual(corr: SoftmaxCorrection) -> torch.Tensor:
    return dequantize_residual(corr.residual, corr.residual_scale)


CASES = [
    pytest.param(1, 63, 2, 64, torch.float16, "bshd", 16, None, False, id="63x64-fp16-bshd"),
    pytest.param(2, 113, 3, 72, torch.bfloat16, "bhsd", 32, torch.float32, False, id="113x72-bf16-bhsd-r32"),
    pytest.param(2, 83, 2, 24, torch.float16, "bshd", 16, FP8, True, id="83x24-fp16-fused-fp8"),
    pytest.param(1, 40, 2, 128, torch.bfloat16, "bshd", 16, torch.bfloat16, False, id="40x128-bf16"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("walk", ["skip", "masked"])
@pytest.mark.parametrize("b, s, h, d, dtype, layout, block, rdtype, noncontig", CASES)
def test_refresh_matches_oracle(b, s, h, d, dtype, layout, block, rdtype, noncontig, walk, monkeypatch):
    """Both walks over the keys outside the plan (skipping its blocks, or masking them: the kernel picks by
    block size) give the oracle's output, LSE, rho and R."""
    from dit_accel.kernels import ops, triton_refresh

    monkeypatch.setattr(triton_refresh, "MASKED_WALK_MAX_BLOCK", 1 << 20 if walk == "masked" else 0)
    monkeypatch.setattr(ops, "_CALLS", {})
    q, k, v = _qkv(b, s, h, d, dtype, layout, seed=s, noncontig=noncontig)
    plan = _random_plan(b, h, s, s, block, 0.35, seed=d)
    kv_len = torch.tensor([s, s - 20][:b], dtype=torch.int32, device=DEVICE)
    out, lse, corr = refresh_attention(
        q, k, v, plan, kv_len=kv_len, layout=layout, backend="triton", residual_dtype=rdtype
    )
    qh, kh, vh = (_bhsd(x, layout) for x in (q, k, v))
    scale = d**-0.5
    ref, ref_lse, ref_rho, ref_r, _ = refresh_reference(qh, kh, vh, plan, scale, kv_len, torch.float32)
    eager_full = _eager_lowp(qh, kh, vh, None, scale, kv_len)
    eager_in = _eager_lowp(qh, kh, vh, plan.to_token_mask(s, s), scale, kv_len)
    _assert_close(_bhsd(out, layout), ref, eager_full, "refresh out")
    _assert_lse(lse, ref_lse, "refresh lse")
    assert corr.rho.shape == (b, h, s) and corr.residual.shape == (b, h, s, d)
    assert corr.residual.dtype == (rdtype or dtype)
    assert (corr.rho >= 0).all() and (corr.rho <= 1 + 1e-6).all()
    assert (corr.rho - ref_rho).abs().max() < 2e-3
    # R = out - rho * O_in: its error is that of the two outputs it combines (plus storage rounding).
    eager_r = eager_full.float() - ref_rho.unsqueeze(-1) * eager_in.float()
    r = _residual(corr)
    if rdtype == FP8:
        # Half an e4m3 step (3 mantissa bits) at the row's scale, plus the outputs' own error.
        bound = 0.0625 * ref_r.abs().amax(-1, keepdim=True) + 4 * (eager_r - ref_r).abs().max() + 2e-3
        assert ((r - ref_r).abs() <= bound).all(), (r - ref_r).abs().max()
    else:
        _assert_close(r, ref_r, eager_r, "refresh R")
    # Rows of a plan row without blocks keep nothing in-mask: rho 0 and R the whole output.
    empty = plan.kv_counts.expand(b, h, -1)[0, 0] == 0
    rows = empty.repeat_interleave(block)[:s]
    assert (corr.rho[0, 0, rows] == 0).all()


@pytest.mark.interpret
@pytest.mark.parametrize("b, s, h, d, dtype, layout, block, rdtype, noncontig", CASES)
def test_mask_statistics_matches_oracle(b, s, h, d, dtype, layout, block, rdtype, noncontig):
    """Given a dense pass's output and LSE, one pass over the plan's blocks writes the refresh's rho and R
    (the two-pass refresh): the oracle's numbers from that dense output, on both backends, with the refresh's
    conventions for rows with no key (rho 1, R 0) and rows whose plan row is empty (rho 0, R the output)."""
    q, k, v = _qkv(b, s, h, d, dtype, layout, seed=s + 1, noncontig=noncontig)
    plan = _random_plan(b, h, s, s, block, 0.35, seed=d + 1)
    kv_len = torch.tensor([s - 20, 0][:b], dtype=torch.int32, device=DEVICE)  # sample 1: no key at all
    out, lse = dense_attention(q, k, v, kv_len=kv_len, layout=layout, backend="torch")
    out = out.to(dtype)
    qh, kh, vh = (_bhsd(x, layout) for x in (q, k, v))
    scale = d**-0.5
    out_in, lse_in = attention_reference(qh.float(), kh.float(), vh.float(), plan, scale, kv_len)
    oh = _bhsd(out, layout).float()
    ref_rho, ref_r, _ = refresh_statistics(oh, lse, out_in, lse_in, torch.float32)
    eager_in = _eager_lowp(qh, kh, vh, plan.to_token_mask(s, s), scale, kv_len)
    eager_r = oh - ref_rho.unsqueeze(-1) * eager_in.float()
    for backend in ("triton", "torch"):
        corr = mask_statistics(
            q, k, v, plan, out, lse, kv_len=kv_len, layout=layout, backend=backend, residual_dtype=rdtype
        )
        assert corr.rho.shape == (b, h, s) and corr.residual.shape == (b, h, s, d), backend
        assert corr.residual.dtype == (rdtype or dtype), backend
        assert (corr.rho >= 0).all() and (corr.rho <= 1).all(), backend
        assert (corr.rho - ref_rho).abs().max() < 2e-3, backend
        r = _residual(corr)
        if rdtype == FP8:
            bound = 0.0625 * ref_r.abs().amax(-1, keepdim=True) + 4 * (eager_r - ref_r).abs().max() + 2e-3
            assert ((r - ref_r).abs() <= bound).all(), (backend, (r - ref_r).abs().max())
        else:
            _assert_close(r, ref_r, eager_r, f"{backend} statistics R")
        empty = plan.kv_counts.expand(b, h, -1)[0, 0] == 0
        rows = empty.repeat_interleave(block)[:s]
        assert (corr.rho[0, 0, rows] == 0).all(), backend
        if b > 1:
            assert (corr.rho[1] == 1).all() and (r[1] == 0).all(), backend
        assert not any(torch.isnan(t).any() for t in corr.tensors().values()), backend


def test_mask_statistics_validation():
    q, k, v = _qkv(1, 40, 2, 16, torch.float16, "bshd")
    plan = BlockPlan.dense(40, 40, 16, 16, device=DEVICE)
    out, lse = dense_attention(q, k, v, backend="torch")
    with pytest.raises(ValueError, match="out must be the dense output"):
        mask_statistics(q, k, v, plan, out[:, :30], lse, backend="torch")
    with pytest.raises(ValueError, match="lse must be fp32"):
        mask_statistics(q, k, v, plan, out, lse.half(), backend="torch")
    with pytest.raises(ValueError, match="residual_dtype"):
        mask_statistics(q, k, v, plan, out, lse, backend="torch", residual_dtype=torch.int8)


@pytest.mark.interpret
@pytest.mark.parametrize("clamp", [True, False], ids=["clamp", "no-clamp"])
@pytest.mark.parametrize("rdtype", [torch.float16, FP8], ids=["r16", "r8"])
@pytest.mark.parametrize("d", [32, 40], ids=["d32", "d40"])  # 40: padded to 64, the epilogue's loads masked
def test_corrected_sparse_matches_oracle(clamp, rdtype, d):
    b, s, h, block = 2, 77, 2, 16
    q, k, v = _qkv(b, s, h, d, torch.float16, "bshd", seed=5)
    plan = _random_plan(b, h, s, s, block, 0.3, seed=9)
    kv_len = torch.tensor([77, 60], dtype=torch.int32, device=DEVICE)
    _, _, corr = refresh_attention(q, k, v, plan, kv_len=kv_len, backend="triton", residual_dtype=rdtype)
    q2, k2, v2 = _qkv(b, s, h, d, torch.float16, "bshd", seed=6)  # a later step's q, k, v
    out, lse = block_sparse_attention(
        q2, k2, v2, plan, kv_len=kv_len, backend="triton", correction=corr, rho_offset=0.3, clamp_rho=clamp
    )
    qh, kh, vh = (x.transpose(1, 2) for x in (q2, k2, v2))
    ref, ref_lse = corrected_reference(
        qh, kh, vh, plan, d**-0.5, corr.rho, corr.residual, corr.residual_scale, kv_len, 0.3, clamp
    )
    sparse_eager = _eager_lowp(qh, kh, vh, plan.to_token_mask(s, s), d**-0.5, kv_len)
    rho = (corr.rho + 0.3).clamp(max=1.0) if clamp else corr.rho + 0.3
    eager = rho.unsqueeze(-1) * sparse_eager.float() + _residual(corr)
    _assert_close(out.transpose(1, 2), ref, eager, "corrected out")
    _, plain_lse = attention_reference(qh, kh, vh, plan, d**-0.5, kv_len)
    _assert_lse(lse, plain_lse, "corrected lse is the sparse lse")
    assert torch.equal(ref_lse, plain_lse)

    # The offset as a device tensor (what a CUDA graph replays with its current value): the same numbers.
    def corrected(backend, rho_offset=0.0):
        return block_sparse_attention(
            q2, k2, v2, plan, kv_len=kv_len, backend=backend, correction=corr, rho_offset=rho_offset,
            clamp_rho=clamp,
        )[0]  # fmt: skip

    for backend in ("triton", "torch"):
        offset = torch.full((1,), 0.3, dtype=torch.float32, device=DEVICE)
        expect = out if backend == "triton" else corrected("torch", 0.3)
        assert torch.equal(corrected(backend, offset), expect), backend
        offset.fill_(0.0)  # the value comes from the tensor
        assert torch.equal(corrected(backend, offset), corrected(backend)), backend
    with pytest.raises(ValueError, match="rho_offset must be a number or a one-element float32 tensor"):
        block_sparse_attention(q2, k2, v2, plan, correction=corr, rho_offset=torch.zeros(2, device=DEVICE))


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_refresh_identity_in_fp32(layout):
    """At the refresh step, rho * O_sparse + R is the dense output to fp32 rounding (no offset, no clamp)."""
    b, s, h, d = 2, 99, 3, 40
    q, k, v = (x.float() for x in _qkv(b, s, h, d, torch.float32, layout, seed=1))
    plan = _random_plan(b, h, s, s, 16, 0.2, seed=2)
    kv_len = torch.tensor([99, 31], dtype=torch.int32, device=DEVICE)
    out, lse, corr = refresh_attention(q, k, v, plan, kv_len=kv_len, layout=layout, backend="torch")
    assert corr.residual.dtype == torch.float32
    sparse, sparse_lse = block_sparse_attention(q, k, v, plan, kv_len=kv_len, layout=layout, backend="torch")
    rho = torch.exp(sparse_lse - lse)
    rho = torch.where(torch.isinf(sparse_lse), 0.0, rho)
    torch.testing.assert_close(corr.rho, rho, atol=1e-6, rtol=1e-5)
    r = _bhsd(out, layout) - corr.rho.unsqueeze(-1) * _bhsd(sparse, layout)
    torch.testing.assert_close(corr.residual, r, atol=1e-5, rtol=1e-5)
    rebuilt, _ = block_sparse_attention(
        q, k, v, plan, kv_len=kv_len, layout=layout, backend="torch", correction=corr, clamp_rho=False
    )
    torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_full_plan_gives_rho_one_and_zero_residual(backend):
    b, s, h, d = 1, 50, 2, 32
    q, k, v = _qkv(b, s, h, d, torch.float16, "bshd", seed=3)
    plan = BlockPlan.dense(s, s, 16, 16, device=DEVICE)
    out, _, corr = refresh_attention(q, k, v, plan, backend=backend, residual_dtype=torch.float32)
    torch.testing.assert_close(corr.rho, torch.ones_like(corr.rho), atol=1e-6, rtol=0)
    assert corr.residual.abs().max() < 1e-6
    dense, _ = block_sparse_attention(q, k, v, plan, backend=backend)
    torch.testing.assert_close(out, dense, atol=2e-3, rtol=0)


def test_rows_without_keys_are_finite():
    """kv_len 0 leaves a sample with no key: out 0, lse -inf, rho 1, R 0 (never NaN)."""
    b, s, h, d = 2, 33, 1, 16
    q, k, v = _qkv(b, s, h, d, torch.float16, "bshd", seed=4)
    plan = _random_plan(b, h, s, s, 16, 0.5, seed=4)
    kv_len = torch.tensor([33, 0], dtype=torch.int32, device=DEVICE)
    out, lse, corr = refresh_attention(q, k, v, plan, kv_len=kv_len, backend="torch")
    assert torch.isinf(lse[1]).all() and (out[1] == 0).all()
    assert (corr.rho[1] == 1).all() and (corr.residual[1] == 0).all()
    assert not any(torch.isnan(t).any() for t in corr.tensors().values())


def test_correction_validation():
    q, k, v = _qkv(1, 40, 2, 16, torch.float16, "bshd")
    plan = BlockPlan.dense(40, 40, 16, 16, device=DEVICE)
    _, _, corr = refresh_attention(q, k, v, plan, backend="torch")
    with pytest.raises(ValueError, match="residual_dtype"):
        refresh_attention(q, k, v, plan, backend="torch", residual_dtype=torch.int8)
    short = _qkv(1, 30, 2, 16, torch.float16, "bshd")
    small = BlockPlan.dense(30, 30, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="does not match"):
        block_sparse_attention(*short, small, backend="torch", correction=corr)
    with pytest.raises(ValueError, match="residual_scale"):
        SoftmaxCorrection(corr.rho, corr.residual.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="rho"):
        SoftmaxCorrection(corr.rho.half(), corr.residual)


@pytest.mark.interpret
def test_refresh_ops_compile_fullgraph():
    """The refresh, statistics and corrected passes trace as custom ops: a fullgraph compile (aot_eager)
    gives the eager numbers, and the statistics op passes torch.library.opcheck."""
    from dit_accel.kernels import ops

    q, k, v = _qkv(1, 70, 2, 32, torch.float16, "bshd", seed=1)
    plan = _random_plan(1, 2, 70, 70, 16, 0.5, seed=2)

    def f(q, k, v):
        out, lse, corr = refresh_attention(q, k, v, plan, backend="triton")
        stats = mask_statistics(q, k, v, plan, out, lse, backend="triton")
        fixed, _ = block_sparse_attention(q, k, v, plan, backend="triton", correction=stats, rho_offset=0.1)
        return out, corr.rho, stats.rho, stats.residual, fixed

    torch._dynamo.reset()
    try:
        eager = f(q, k, v)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    finally:
        torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    out, lse = eager[0], dense_attention(q, k, v, backend="triton")[1]
    qh, kh, vh, oh = (x.transpose(1, 2) for x in (q, k, v, out))
    args = (qh, kh, vh, plan.kv_indices, plan.kv_counts, 16, 16, 32**-0.5, None, oh, lse, torch.float16)
    torch.library.opcheck(ops._mask_statistics_op, args)
