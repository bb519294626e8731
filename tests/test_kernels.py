"""Kernel correctness: Triton (interpreted on CPU, compiled on GPU) against the fp32 torch oracle.

Tolerances come from the data (STYLE.md 5): the kernel's error against an fp32 oracle must be at most a
small multiple of the error of eager attention computed in the input dtype.
"""

import math
import os
from pathlib import Path

import pytest
import torch

from dit_accel.kernels import BlockPlan, block_mass, block_sparse_attention, dense_attention
from dit_accel.kernels.reference import attention_reference, block_mass_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_uninitialized():
    """torch.empty fills floats with NaN, so an output element the kernel never writes fails loudly."""
    import torch.utils.deterministic as det

    old_flag, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old_flag)
    det.fill_uninitialized_memory = old_fill


def _qkv(b, s, h, d, dtype, layout, seed=0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        # q, k, v as views into one fused projection, the way fused-QKV models produce them.
        fused = torch.randn(b, s, 3, h, d, generator=g).to(dtype).to(DEVICE)
        q, k, v = fused.unbind(2)
        if layout == "bhsd":
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return q, k, v
    shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
    return tuple(torch.randn(shape, generator=g).to(dtype).to(DEVICE) for _ in range(3))


def _bhsd(x, layout):
    return x.transpose(1, 2) if layout == "bshd" else x


def _random_plan(b, h, s_q, s_k, block, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_qb, n_kb = -(-s_q // block), -(-s_k // block)
    mask = torch.rand(b, h, n_qb, n_kb, generator=g) < density
    mask[0, 0, 0] = False  # an empty row
    mask[-1, -1, -1] = True  # a full row
    return BlockPlan.from_block_mask(mask.to(DEVICE), block, block)


def _eager_lowp(qh, kh, vh, token_mask, scale, kv_len=None):
    """Attention as eager PyTorch does it in the input dtype (scores and P rounded to it)."""
    s = torch.matmul(qh, kh.transpose(-1, -2)).float() * scale
    keep = token_mask if token_mask is not None else torch.ones_like(s, dtype=torch.bool)
    if kv_len is not None:
        cols = torch.arange(kh.shape[2], device=kh.device)
        keep = keep & (cols[None, :] < kv_len[:, None])[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).to(qh.dtype)
    return torch.matmul(p, vh)


def _assert_close(out, ref, eager, name, factor=4.0, floor=2e-3):
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    err = (out.float() - ref.float()).abs().max().item()
    eager_err = (eager.float() - ref.float()).abs().max().item()
    tol = factor * eager_err + floor
    rel = err / max(ref.float().abs().max().item(), 1e-6)
    assert err <= tol, (
        f"{name}: max abs err {err:.3e} (rel {rel:.3e}) > {tol:.3e} (eager err {eager_err:.3e})"
    )


def _assert_lse(lse, ref_lse, name):
    assert lse.dtype == torch.float32
    assert not torch.isnan(lse).any(), f"{name}: NaN in lse"
    inf = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), inf), f"{name}: -inf rows differ"
    if (~inf).any():
        err = (lse[~inf] - ref_lse[~inf]).abs().max().item()
        assert err < 2e-2, f"{name}: lse max abs err {err:.3e}"


# --------------------------------------------------------------------------------------------------
# BlockPlan
# --------------------------------------------------------------------------------------------------
def test_plan_roundtrip_and_density():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 3, 7, 9, generator=g) < 0.4
    mask[0, 1, 2] = False
    mask[1, 2, 3] = True
    plan = BlockPlan.from_block_mask(mask, 64, 64)
    assert torch.equal(plan.to_block_mask(), mask)
    assert torch.equal(plan.kv_counts, mask.sum(-1).to(torch.int32))
    for b, h, p in [(0, 0, 0), (1, 2, 3), (0, 2, 6)]:
        c = int(plan.kv_counts[b, h, p])
        row = plan.kv_indices[b, h, p, :c]
        assert torch.equal(row, torch.nonzero(mask[b, h, p]).flatten().to(torch.int32))
    assert plan.density() == pytest.approx(mask.float().mean().item())
    tok = plan.to_token_mask(7 * 64 - 5, 9 * 64 - 30)
    assert tok.shape == (2, 3, 7 * 64 - 5, 9 * 64 - 30)
    assert torch.equal(tok[:, :, ::64, ::64], mask)


def test_plan_dense_and_validation():
    plan = BlockPlan.dense(300, 200, 128, 64)
    assert plan.num_q_blocks == 3 and plan.num_kv_blocks == 4 and plan.density() == 1.0
    with pytest.raises(ValueError, match="int32"):
        BlockPlan(
            64, 64, torch.zeros(1, 1, 2, 2, dtype=torch.int64), torch.zeros(1, 1, 2, dtype=torch.int32), 2
        )
    with pytest.raises(ValueError, match="disagree"):
        BlockPlan(
            64, 64, torch.zeros(1, 1, 3, 2, dtype=torch.int32), torch.zeros(1, 1, 2, dtype=torch.int32), 2
        )


# --------------------------------------------------------------------------------------------------
# Reference (oracle) sanity
# --------------------------------------------------------------------------------------------------
def test_reference_matches_sdpa_and_full_plan():
    q, k, v = _qkv(2, 77, 3, 32, torch.float32, "bhsd")
    plan = BlockPlan.dense(77, 77, 16, 16)
    out, lse = attention_reference(q, k, v, plan, 0.3)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)
    ref_lse = torch.logsumexp(torch.matmul(q, k.transpose(-1, -2)) * 0.3, -1)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    out2, _ = attention_reference(q, k, v, None, 0.3)
    torch.testing.assert_close(out, out2)


def test_reference_chunking_is_invisible(monkeypatch):
    import dit_accel.kernels.reference as ref

    q, k, v = _qkv(1, 150, 2, 16, torch.float32, "bhsd", seed=3)
    plan = _random_plan(1, 2, 150, 150, 16, 0.5)
    full = ref.attention_reference(q, k, v, plan, 0.25)
    lse = full[1].clone()
    w_full = ref.block_mass_reference(q, k, lse, 16, 16, 0.25)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 2 * 16 * 150)
    chunked = ref.attention_reference(q, k, v, plan, 0.25)
    torch.testing.assert_close(full[0], chunked[0])
    torch.testing.assert_close(w_full, ref.block_mass_reference(q, k, lse, 16, 16, 0.25))


# --------------------------------------------------------------------------------------------------
# Triton sparse attention
# --------------------------------------------------------------------------------------------------
CASES = [
    pytest.param(1, 1, 2, 64, torch.bfloat16, "bshd", 16, False, id="S1-d64-bf16-bshd"),
    pytest.param(2, 63, 2, 72, torch.float16, "bhsd", 32, False, id="S63-d72-fp16-bhsd"),
    pytest.param(1, 113, 3, 128, torch.bfloat16, "bshd", 32, False, id="S113-d128-bf16-bshd"),
    pytest.param(2, 200, 1, 64, torch.float16, "bshd", 16, True, id="S200-d64-fp16-fusedqkv"),
    pytest.param(1, 200, 2, 80, torch.bfloat16, "bhsd", 64, True, id="S200-d80-bf16-bhsd-fusedqkv"),
    pytest.param(1, 799, 1, 64, torch.bfloat16, "bhsd", 64, False, id="S799-d64-bf16"),
]


@pytest.mark.interpret
@pytest.mark.parametrize("b,s,h,d,dtype,layout,block,noncontig", CASES)
def test_sparse_attention_matches_oracle(b, s, h, d, dtype, layout, block, noncontig):
    q, k, v = _qkv(b, s, h, d, dtype, layout, noncontig=noncontig)
    plan = _random_plan(b, h, s, s, block, density=0.2 if s > 500 else 0.45)
    out, lse = block_sparse_attention(q, k, v, plan, layout=layout, backend="triton")
    assert out.shape == q.shape and lse.shape == (b, h, s)
    qh, kh, vh = (_bhsd(x, layout) for x in (q, k, v))
    scale = 1 / math.sqrt(d)
    ref, ref_lse = attention_reference(qh.float(), kh.float(), vh.float(), plan, scale)
    eager = _eager_lowp(qh, kh, vh, plan.to_token_mask(s, s), scale)
    _assert_close(_bhsd(out, layout), ref, eager, "out")
    _assert_lse(lse, ref_lse, "lse")
    empty = plan.kv_counts == 0
    if empty.any():
        rows = empty.repeat_interleave(plan.block_q, dim=-1)[..., :s].expand(b, h, s)
        assert (_bhsd(out, layout)[rows] == 0).all() and torch.isneginf(lse[rows]).all()


def _compile_for_hopper(configs: list[dict]) -> list[dict]:
    """tests/_aot.py in a process without the interpreter: each configuration compiled for sm_90."""
    import json
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if not triton.__version__.startswith("3.6."):
        pytest.skip(f"compiled against Triton 3.6 (the GPU machines'), not {triton.__version__}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "_aot.py"
    cmd = [sys.executable, str(script), json.dumps(configs)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_kernels_compile_for_hopper():
    """Every kernel builds for an H100 / H200 on a machine without one (the interpreter tests do not compile
    anything): the attention kernel's sparse, dense, corrected and pointer-load paths, the refresh kernel with
    fp16 and fp8 residuals, block mass, both rotary conventions and the block step (``fuse_blocks``). The
    tensor-core paths use wgmma."""
    configs = [
        {"kernel": "attention"},
        {"kernel": "attention", "DENSE": True},
        {"kernel": "attention", "HAS_CORR": True, "RHO_DEV": True, "R_SCALED": True, "HAS_KV_LEN": True},
        {"kernel": "attention", "HEAD_DIM": 72, "USE_TMA": False, "HAS_KV_LEN": True, "num_warps": 4},
        {"kernel": "refresh"},
        {"kernel": "refresh", "R_FP8": True, "HAS_KV_LEN": True},
        {"kernel": "mass"},
        {"kernel": "rotary"},
        {"kernel": "rotary", "MODE": 0, "PAIRS": True},
        {"kernel": "block"},
        {"kernel": "block", "RESIDUAL": 1, "NORM": 2, "BLOCK_D": 2048, "num_warps": 4},
    ]
    results = _compile_for_hopper(configs)
    for config, result in zip(configs, results):
        if config["kernel"] not in ("rotary", "block"):
            assert "m64n128k16" in result["wgmma"], (config, result)
        assert result["registers"] is not None and result["registers"] <= 255, (config, result)


@pytest.mark.interpret
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_full_plan_equals_dense(layout):
    q, k, v = _qkv(2, 97, 2, 64, torch.float16, layout, seed=5)
    plan = BlockPlan.dense(97, 97, 32, 32, device=DEVICE)
    out, lse = block_sparse_attention(q, k, v, plan, layout=layout, backend="triton")
    dout, dlse = dense_attention(q, k, v, layout=layout, backend="triton")
    torch.testing.assert_close(out, dout, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, dlse, atol=1e-4, rtol=0)
    qh, kh, vh = (_bhsd(x, layout).float() for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    eager = _eager_lowp(*(_bhsd(x, layout) for x in (q, k, v)), None, 1 / 8)
    _assert_close(_bhsd(dout, layout), sdpa, eager, "dense")


@pytest.mark.interpret
def test_plan_broadcast_and_per_head_counts():
    b, s, h, d = 2, 90, 3, 64
    q, k, v = _qkv(b, s, h, d, torch.bfloat16, "bshd", seed=7)
    n = -(-s // 32)
    shared = BlockPlan.from_block_mask((torch.rand(1, 1, n, n) < 0.5).to(DEVICE), 32, 32)
    per_head = torch.zeros(1, h, n, n, dtype=torch.bool)
    for i in range(h):
        per_head[0, i, :, : i + 1] = True  # head i attends i+1 key blocks
    per_head = BlockPlan.from_block_mask(per_head.to(DEVICE), 32, 32)
    for plan in (shared, per_head):
        out, _ = block_sparse_attention(q, k, v, plan, backend="triton")
        ref, _ = attention_reference(*(x.transpose(1, 2).float() for x in (q, k, v)), plan, 1 / 8)
        eager = _eager_lowp(*(x.transpose(1, 2) for x in (q, k, v)), plan.to_token_mask(s, s), 1 / 8)
        _assert_close(out.transpose(1, 2), ref, eager, "broadcast plan")


@pytest.mark.interpret
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_kv_len(sparse):
    b, s, h, d = 3, 75, 2, 64
    q, k, v = _qkv(b, s, h, d, torch.float16, "bshd", seed=11)
    kv_len = torch.tensor([75, 40, 0], dtype=torch.int32, device=DEVICE)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if sparse:
        plan = _random_plan(b, h, s, s, 16, 0.6, seed=2)
        out, lse = block_sparse_attention(q, k, v, plan, kv_len=kv_len, backend="triton")
        ref, ref_lse = attention_reference(qh.float(), kh.float(), vh.float(), plan, 0.125, kv_len)
        tok = plan.to_token_mask(s, s)
    else:
        out, lse = dense_attention(q, k, v, kv_len=kv_len, backend="triton")
        ref, ref_lse = attention_reference(qh.float(), kh.float(), vh.float(), None, 0.125, kv_len)
        tok = None
    eager = _eager_lowp(qh, kh, vh, tok, 0.125, kv_len)
    _assert_close(out.transpose(1, 2), ref, eager, "kv_len out")
    _assert_lse(lse, ref_lse, "kv_len lse")
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()


@pytest.mark.interpret
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_running_max_that_jumps_and_creeps(sparse):
    """Scores whose row maximum grows along the keys, by less and by more than the kernel's lazy-rescaling
    threshold (2**8) from one key tile to the next, and shrinks again: the accumulator must be rescaled
    exactly when the reference maximum moves. The sequence tail (150 = 9 full blocks + 6) is masked."""
    b, s, h, d = 1, 150, 2, 64
    q, k, v = _qkv(b, s, h, d, torch.bfloat16, "bshd", seed=13)
    ramp = torch.tensor([0.5, 0.6, 0.8, 3.0, 3.2, 9.0, 9.5, 2.0, 12.0, 1.0], device=DEVICE)
    k = (k.float() * ramp.repeat_interleave(16)[:s, None, None]).to(k.dtype)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if sparse:
        plan = _random_plan(b, h, s, s, 16, 0.7, seed=4)
        out, lse = block_sparse_attention(q, k, v, plan, backend="triton")
        tok = plan.to_token_mask(s, s)
    else:
        plan, tok = None, None
        out, lse = dense_attention(q, k, v, backend="triton")
    ref, ref_lse = attention_reference(qh.float(), kh.float(), vh.float(), plan, 0.125)
    eager = _eager_lowp(qh, kh, vh, tok, 0.125)
    _assert_close(out.transpose(1, 2), ref, eager, "out")
    _assert_lse(lse, ref_lse, "lse")


# --------------------------------------------------------------------------------------------------
# Block mass
# --------------------------------------------------------------------------------------------------
@pytest.mark.interpret
@pytest.mark.parametrize(
    "s,d,block_q,block_k,layout",
    [
        pytest.param(113, 64, 32, 16, "bshd", id="S113-split-q"),
        pytest.param(70, 72, 16, 32, "bhsd", id="S70-d72-split-k"),
    ],
)
def test_block_mass_matches_reference(s, d, block_q, block_k, layout):
    b, h = 2, 2
    q, k, _ = _qkv(b, s, h, d, torch.bfloat16, layout, seed=13)
    kv_len = torch.tensor([s, s // 2], dtype=torch.int32, device=DEVICE)
    qh, kh = _bhsd(q, layout), _bhsd(k, layout)
    _, lse = dense_attention(q, k, q, kv_len=kv_len, layout=layout, backend="torch")
    lse[0, 1, :5] = float("-inf")  # rows with no key contribute nothing
    w = block_mass(q, k, lse, block_q, block_k, kv_len=kv_len, layout=layout, backend="triton")
    ref = block_mass_reference(qh.float(), kh.float(), lse, block_q, block_k, 1 / math.sqrt(d), kv_len)
    assert w.shape == ref.shape == (b, h, -(-s // block_q), -(-s // block_k))
    torch.testing.assert_close(w, ref, atol=2e-3 * block_q, rtol=2e-3)
    # With the fresh LSE of a dense pass, each row of W sums to its number of rows.
    _, fresh = dense_attention(q, k, q, layout=layout, backend="torch")
    w = block_mass(q, k, fresh, block_q, block_k, layout=layout, backend="triton")
    rows = torch.full((w.shape[2],), float(block_q), device=w.device)
    rows[-1] = s - block_q * (w.shape[2] - 1)
    torch.testing.assert_close(w.sum(-1), rows.expand_as(w.sum(-1)), atol=2e-2, rtol=1e-3)


@pytest.mark.interpret
def test_tensor_descriptor_path(monkeypatch):
    """The tensor-descriptor path (taken on Hopper) computes the same function; the interpreter runs it."""
    from dit_accel.kernels import triton_attention, triton_mass

    monkeypatch.setattr(triton_attention, "tma_ok", lambda *t: True)
    monkeypatch.setattr(triton_mass, "tma_ok", lambda *t: True)
    b, s, h, d = 2, 83, 2, 72
    q, k, v = _qkv(b, s, h, d, torch.float16, "bshd", seed=23)
    kv_len = torch.tensor([83, 50], dtype=torch.int32, device=DEVICE)
    plan = _random_plan(b, h, s, s, 32, 0.5, seed=6)
    out, lse = block_sparse_attention(q, k, v, plan, kv_len=kv_len, backend="triton")
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    ref, ref_lse = attention_reference(qh.float(), kh.float(), vh.float(), plan, d**-0.5, kv_len)
    eager = _eager_lowp(qh, kh, vh, plan.to_token_mask(s, s), d**-0.5, kv_len)
    _assert_close(out.transpose(1, 2), ref, eager, "tma out")
    _assert_lse(lse, ref_lse, "tma lse")
    w = block_mass(q, k, ref_lse, 32, 16, kv_len=kv_len, backend="triton")
    w_ref = block_mass_reference(qh.float(), kh.float(), ref_lse, 32, 16, d**-0.5, kv_len)
    torch.testing.assert_close(w, w_ref, atol=2e-3 * 32, rtol=2e-3)


@pytest.mark.interpret
def test_launch_goes_through_the_autotuner_once_per_key(monkeypatch):
    """After a key's first launch the recorded config is launched directly: same output; a new key (another
    plan block size) goes through the autotuner again."""
    from dit_accel.kernels import triton_attention, triton_common

    kernel = triton_attention._block_sparse_attn_fwd_kernel
    monkeypatch.setattr(triton_common, "_TUNED", {})
    tuned = []
    run = type(kernel).run
    monkeypatch.setattr(
        type(kernel), "run", lambda self, *a, **kw: tuned.append(kw["PLAN_BQ"]) or run(self, *a, **kw)
    )
    q, k, v = _qkv(1, 70, 2, 32, torch.float16, "bshd", seed=3)
    plan = _random_plan(1, 2, 70, 70, 16, 0.5, seed=2)
    first, first_lse = block_sparse_attention(q, k, v, plan, backend="triton")
    again, again_lse = block_sparse_attention(q, k, v, plan, backend="triton")
    assert tuned == [16] and len(triton_common._TUNED) == 1
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(again_lse, first_lse, atol=0, rtol=0)
    block_sparse_attention(q, k, v, _random_plan(1, 2, 70, 70, 32, 0.5, seed=2), backend="triton")
    assert tuned == [16, 32] and len(triton_common._TUNED) == 2
    picks = triton_common.tuned_configs()  # what benchmarks record per row
    assert [(p["kernel"], p["key"]["PLAN_BQ"]) for p in picks] == [
        ("_block_sparse_attn_fwd_kernel", "16"),
        ("_block_sparse_attn_fwd_kernel", "32"),
    ]
    assert picks[0]["dtypes"][0] == "torch.float16" and "BLOCK_M" in picks[0]["config"]


def _drifting_timer(costs, slow_calls, factor):
    """A fake round timer: call i costs ``costs[i]`` ms, except that the first ``slow_calls`` calls timed in
    the whole tuning run ``factor`` times slower (a GPU whose clocks are still rising)."""
    timed = [0]

    def time_round(calls):
        out = []
        for call in calls:
            out.append(costs[call()] * (factor if timed[0] < slow_calls else 1.0))
            timed[0] += 1
        return out

    return time_round


def test_interleaved_tuner_is_not_fooled_by_a_slow_start():
    """The fastest candidate is the first one, and the GPU runs 1.3x slower for the first six timed calls.
    Timing the candidates one after another (four calls each, as the autotuner does for a 26 ms kernel) would
    pick the third; interleaved rounds pick the first."""
    from dit_accel.kernels.triton_common import tune_interleaved

    costs = [0.90, 1.00, 0.95]
    calls = [lambda i=i: i for i in range(3)]

    timer = _drifting_timer(costs, slow_calls=6, factor=1.3)
    sequential = [sorted(timer([c])[0] for _ in range(4))[1:3] for c in calls]  # median of four, per call
    assert min(range(3), key=lambda i: sum(sequential[i])) == 2  # the scenario fools sequential timing

    best, medians = tune_interleaved(calls, _drifting_timer(costs, slow_calls=6, factor=1.3), budget_ms=0)
    assert best == 0 and medians == pytest.approx(costs)


def test_interleaved_tuner_rotates_which_candidate_runs_first():
    """A round's first call pays a penalty (it follows the spin kernel): rotating the order spreads it, so
    no candidate is always the one that pays."""
    from dit_accel.kernels.triton_common import tune_interleaved

    costs = [0.90, 1.00, 0.95]
    calls = [lambda i=i: i for i in range(3)]
    rounds = []

    def time_round(fns):
        ids = [fn() for fn in fns]
        rounds.append(ids)
        return [costs[i] + (0.5 if pos == 0 else 0.0) for pos, i in enumerate(ids)]

    best, medians = tune_interleaved(calls, time_round, min_rounds=5, budget_ms=0)
    assert best == 0 and medians == pytest.approx(costs)
    assert [r[0] for r in rounds] == [0, 1, 2, 0, 1] and all(sorted(r) == [0, 1, 2] for r in rounds)


def test_interleaved_tuner_runs_until_its_budget_or_its_round_limit():
    from dit_accel.kernels.triton_common import tune_interleaved

    calls = [lambda: 0, lambda: 1]
    n = []

    def time_round(fns):
        n.append(1)
        return [10.0 for _ in fns]

    tune_interleaved(calls, time_round, min_rounds=3, max_rounds=50, budget_ms=100)
    assert len(n) == 5  # 20 ms a round: the budget is reached after five
    n.clear()
    tune_interleaved(calls, time_round, min_rounds=3, max_rounds=4, budget_ms=1e9)
    assert len(n) == 4


def test_tune_drops_a_candidate_that_does_not_fit_and_times_the_rest(monkeypatch):
    """A candidate whose first call raises OutOfResources (too much shared memory) is left out, as the
    autotuner leaves it out; if none fits, the error is raised."""
    from types import SimpleNamespace

    from triton.runtime.errors import OutOfResources

    from dit_accel.kernels import triton_common

    ran = []

    class Jit:
        too_big = {64}

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                if kwargs["BLOCK_M"] in self.too_big:
                    raise OutOfResources(300_000, 232_448, "shared memory")
                ran.append(kwargs["BLOCK_M"])
                return kwargs["BLOCK_M"]

            return run

    configs = [triton_common.cfg(*c) for c in ((64, 64, 4, 3), (16, 16, 4, 1), (32, 32, 4, 1))]
    kernel = SimpleNamespace(configs=configs, early_config_prune=None, arg_names=["x"], fn=Jit())

    def time_round(calls):
        out = []
        for call in calls:
            call()
            out.append({16: 2.0, 32: 1.0}[ran[-1]])
        return out

    monkeypatch.setattr(triton_common, "cuda_round_timer", time_round)
    config, record = triton_common._tune(kernel, (1,), (torch.zeros(1),), {})
    assert config.kwargs["BLOCK_M"] == 32
    assert record["tuner"] == "interleaved" and set(record["ms"]) == {str(configs[1]), str(configs[2])}
    assert 64 not in ran and ran[:2] == [16, 32]  # each candidate ran once before the timing

    Jit.too_big = {64, 16, 32}
    with pytest.raises(OutOfResources):
        triton_common._tune(kernel, (1,), (torch.zeros(1),), {})


@pytest.mark.interpret
def test_interleaved_tuner_picks_the_tile_and_the_launch_returns_its_output(monkeypatch):
    """With DIT_ACCEL_TUNER=interleaved, the first launch of a key times the autotuner's candidates and keeps
    the fastest: the output is the kernel's under that tile (bit-identical to the next, recorded launch) and
    the pick and the candidates' medians are in ``tuned_configs()``."""
    from dit_accel.kernels import triton_attention, triton_common

    kernel = triton_attention._block_sparse_attn_fwd_kernel
    slow, fast = triton_common.cfg(16, 16, 4, 1), triton_common.cfg(16, 16, 2, 1)
    monkeypatch.setattr(kernel, "configs", [slow, fast])
    monkeypatch.setattr(triton_common, "_TUNER", "interleaved")
    monkeypatch.setattr(triton_common, "_TUNED", {})
    monkeypatch.setattr(triton_common, "_TUNING", {})
    rounds = []

    def time_round(calls):
        rounds.append(len(calls))
        return [1.0 if call.__defaults__[0]["num_warps"] == 4 else 0.5 for call in calls]

    monkeypatch.setattr(triton_common, "cuda_round_timer", time_round)
    q, k, v = _qkv(1, 70, 2, 32, torch.float16, "bshd", seed=3)
    plan = _random_plan(1, 2, 70, 70, 16, 0.5, seed=2)
    first, first_lse = block_sparse_attention(q, k, v, plan, backend="triton")
    assert rounds and set(rounds) == {2}
    (pick,) = triton_common.tuned_configs()
    assert pick["config"] == str(fast) and pick["tuning"]["tuner"] == "interleaved"
    assert pick["tuning"]["ms"] == {str(slow): 1.0, str(fast): 0.5}
    tuned_rounds = len(rounds)
    again, again_lse = block_sparse_attention(q, k, v, plan, backend="triton")
    assert len(rounds) == tuned_rounds  # no tuning at the second launch
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    torch.testing.assert_close(again_lse, first_lse, atol=0, rtol=0)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    ref, _ = attention_reference(qh.float(), kh.float(), vh.float(), plan, 32**-0.5)
    torch.testing.assert_close(first.transpose(1, 2).float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_interleaved_tuner_times_kernels_and_picks_a_correct_tile(monkeypatch):
    """On the GPU: the round timer orders work by its size (the spin ahead of the round keeps host gaps
    out), and a tuned launch gives the reference's output with every candidate timed."""
    from dit_accel.kernels import triton_common

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    small, big = a[:1024], a
    calls = [lambda: small @ a, lambda: big @ a]
    for call in calls:  # warm, as the tuner runs each candidate once before timing: a process's first
        call()  # product spends ~100 ms on the host (cuBLAS set-up), which no spin hides
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    ms = triton_common.cuda_round_timer(calls)
    assert 0 < ms[0] < ms[1]
    assert torch.cuda.memory_allocated() == allocated  # the L2 flush buffer is not kept

    monkeypatch.setattr(triton_common, "_TUNER", "interleaved")
    monkeypatch.setattr(triton_common, "_TUNED", {})
    monkeypatch.setattr(triton_common, "_TUNING", {})
    s, h, d = 4000, 4, 128
    q, k, v = _qkv(1, s, h, d, torch.bfloat16, "bshd", seed=9)
    plan = _random_plan(1, h, s, s, 128, 0.3, seed=9)
    out, lse = block_sparse_attention(q, k, v, plan, backend="triton")
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    ref, ref_lse = attention_reference(qh.float(), kh.float(), vh.float(), plan, d**-0.5)
    eager = _eager_lowp(qh, kh, vh, plan.to_token_mask(s, s), d**-0.5, None)
    _assert_close(out.transpose(1, 2), ref, eager, "tuned out")
    _assert_lse(lse, ref_lse, "tuned lse")
    (pick,) = triton_common.tuned_configs()
    assert pick["tuning"]["tuner"] == "interleaved" and len(pick["tuning"]["ms"]) > 1
    assert all(m > 0 for m in pick["tuning"]["ms"].values())


def test_exact_launch_key_separates_what_triton_specialises_on():
    """A direct launch reuses a compiled kernel only under an identical key: the key must differ wherever
    Triton's binder could pick another specialisation (alignment, dtype, int value, constexpr, grid)."""
    from dit_accel.kernels.triton_common import _exact_key

    buf = torch.zeros(64, dtype=torch.float16)
    aligned, misaligned = buf[:32], buf[1:33]  # data pointers 0 and 2 bytes past a 16-byte boundary

    def key(*args, grid=(4, 2, 1), **kwargs):
        return _exact_key("k", "cfg", grid, 0, args, {"HEAD_DIM": 64, **kwargs})

    base = key(aligned, 16, 1.5)
    assert key(buf[8:40], 16, 2.5) == base  # another aligned tensor, another float: same kernel
    assert key(misaligned, 16, 1.5) != base
    assert key(aligned.to(torch.bfloat16), 16, 1.5) != base
    assert key(aligned, 17, 1.5) != base and key(aligned, 1, 1.5) != key(aligned, True, 1.5)
    assert key(aligned, 16, 1.5, HEAD_DIM=80) != base
    assert key(aligned, 16, 1.5, grid=(4, 4, 1)) != base


@pytest.mark.gpu
def test_gpu_direct_launch_matches_triton_launch(monkeypatch):
    """Direct launches (the recorded compiled kernel, no binder) give bit-identical results to Triton's own
    launch path, and a misaligned view or another batch size gets its own entry instead of a wrong reuse."""
    from dit_accel.kernels import ops, triton_common

    if not triton_common._DIRECT_ON:
        pytest.skip(f"direct launches are off for triton {triton_common.triton.__version__}")
    # every call through the launcher (the call cache has its own test), none compiled by an earlier test
    monkeypatch.setattr(ops, "_CALL_CACHE", False)
    monkeypatch.setattr(triton_common, "_COMPILED", {})
    direct = []
    launch = triton_common._direct_launch
    monkeypatch.setattr(triton_common, "_direct_launch", lambda *a: direct.append(launch(*a)) or direct[-1])
    s, h, d = 1000, 4, 64
    buf = torch.randn(3, 2, s * h * d + 8, device="cuda").to(torch.bfloat16)
    cases = {
        "aligned": [buf[i, :, : s * h * d].view(2, s, h, d) for i in range(3)],
        "misaligned": [buf[i, :, 1 : s * h * d + 1].view(2, s, h, d) for i in range(3)],
        "batch1": [buf[i, :1, : s * h * d].view(1, s, h, d) for i in range(3)],
    }
    assert cases["misaligned"][0].data_ptr() % 16
    plan = _random_plan(2, h, s, s, 128, 0.4, seed=6)
    plan1 = _random_plan(1, h, s, s, 128, 0.4, seed=6)
    for name, (q, k, v) in cases.items():
        p = plan1 if name == "batch1" else plan
        outs = [block_sparse_attention(q, k, v, p, backend="triton") for _ in range(3)]
        monkeypatch.setattr(triton_common, "_DIRECT_ON", False)
        ref = block_sparse_attention(q, k, v, p, backend="triton")
        monkeypatch.setattr(triton_common, "_DIRECT_ON", True)
        for out, lse in outs:
            torch.testing.assert_close(out, ref[0], atol=0, rtol=0, msg=name)
            torch.testing.assert_close(lse, ref[1], atol=0, rtol=0, msg=name)
    assert any(direct), "no launch went direct"
    # each case's first Triton-path launch records its own entry; the later ones of that case go direct
    assert direct.count(False) >= 3


@pytest.mark.interpret
def test_eager_calls_skip_the_custom_op_and_traced_calls_take_it(monkeypatch):
    """Plain eager calls run the launcher directly; under a dispatch mode (fake tensors, tracing) the call is
    the registered custom op, which such modes see as one node."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dit_accel.kernels import ops

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = _qkv(1, 40, 2, 32, torch.float16, "bshd", seed=4)
    plan = _random_plan(1, 2, 40, 40, 16, 0.5, seed=5)
    calls = []
    op = ops._sparse_attention_op
    monkeypatch.setattr(ops, "_sparse_attention_op", lambda *a: calls.append(1) or op(*a))
    eager, _ = block_sparse_attention(q, k, v, plan, backend="triton")
    assert calls == []
    with Seen() as seen:
        traced, _ = block_sparse_attention(q, k, v, plan, backend="triton")
    assert calls == [1] and any("dit_accel.sparse_attention" in name for name in seen.ops)
    torch.testing.assert_close(traced, eager, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# Validation and dispatch
# --------------------------------------------------------------------------------------------------
def test_validation_errors():
    q, k, v = _qkv(1, 40, 2, 32, torch.float16, "bshd")
    plan = BlockPlan.dense(40, 40, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="k has dtype"):
        block_sparse_attention(q, k.float(), v, plan)
    with pytest.raises(ValueError, match="v has 39 tokens"):
        block_sparse_attention(q, k, v[:, :39], plan)
    with pytest.raises(ValueError, match="head_dim"):
        block_sparse_attention(q, k[..., :16], v, plan)
    with pytest.raises(ValueError, match="layout"):
        block_sparse_attention(q, k, v, plan, layout="sbhd")
    with pytest.raises(ValueError, match="query blocks"):
        block_sparse_attention(q, k, v, BlockPlan.dense(80, 40, 16, 16, device=DEVICE))
    with pytest.raises(ValueError, match="key blocks"):
        block_sparse_attention(q, k, v, BlockPlan.dense(40, 80, 16, 16, device=DEVICE))
    with pytest.raises(ValueError, match="plan has B=1, H=3"):
        block_sparse_attention(q, k, v, plan.expand(1, 3))
    with pytest.raises(ValueError, match="kv_len"):
        dense_attention(q, k, v, kv_len=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="backend"):
        dense_attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="4-D"):
        dense_attention(q[0], k, v)
    with pytest.raises(ValueError, match="lse must be"):
        block_mass(q, k, torch.zeros(1, 2, 39), 16, 16)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: dtype torch.float32"):
        block_sparse_attention(q.float(), k.float(), v.float(), plan, backend="triton")


def test_torch_backend_accepts_fp32_and_auto_uses_it_on_cpu():
    q, k, v = _qkv(1, 40, 2, 32, torch.float32, "bshd")
    plan = BlockPlan.dense(40, 40, 16, 16, device=DEVICE)
    out, lse = block_sparse_attention(q, k, v, plan, backend="auto")
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    torch.testing.assert_close(out.transpose(1, 2), sdpa, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# GPU only: real shapes, cuDNN LSE, torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("s,d", [(4099, 128), (3001, 72), (2048, 64)])
def test_gpu_sparse_and_dense_real_blocks(s, d):
    q, k, v = _qkv(2, s, 4, d, torch.bfloat16, "bshd", seed=17)
    plan = _random_plan(2, 4, s, s, 128, 0.3, seed=4)
    out, lse = block_sparse_attention(q, k, v, plan)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    ref, ref_lse = attention_reference(qh, kh, vh, plan, 1 / math.sqrt(d))
    eager = _eager_lowp(qh, kh, vh, plan.to_token_mask(s, s), 1 / math.sqrt(d))
    _assert_close(out.transpose(1, 2), ref.float(), eager, "gpu sparse")
    _assert_lse(lse, ref_lse, "gpu sparse lse")
    for backend in ("auto", "triton"):
        dout, dlse = dense_attention(q, k, v, backend=backend)
        ref, ref_lse = attention_reference(qh, kh, vh, None, 1 / math.sqrt(d))
        _assert_close(
            dout.transpose(1, 2), ref.float(), _eager_lowp(qh, kh, vh, None, 1 / math.sqrt(d)), backend
        )
        _assert_lse(dlse, ref_lse, backend)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    q, k, v = _qkv(1, 1000, 2, 64, torch.bfloat16, "bshd", seed=19)
    plan = _random_plan(1, 2, 1000, 1000, 128, 0.5)

    def f(q, k, v):
        out, lse = block_sparse_attention(q, k, v, plan)
        w = block_mass(q, k, lse, 128, 128)
        return out * 2, w

    eager = f(q, k, v)
    compiled = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


def _uncached(monkeypatch, *args, op=block_sparse_attention, **kwargs):
    """``op(*args, **kwargs)`` (default ``block_sparse_attention``) with the call cache off."""
    from dit_accel.kernels import ops

    monkeypatch.setattr(ops, "_CALL_CACHE", False)
    try:
        return op(*args, **kwargs)
    finally:
        monkeypatch.setattr(ops, "_CALL_CACHE", True)


@pytest.mark.interpret
def test_repeated_calls_replay_the_recorded_launch(monkeypatch):
    """A call whose inputs match an earlier call's metadata skips the checks and the launcher and replays the
    recorded launch with its own tensors: bit-identical to an uncached call, corrected calls (rho offset as a
    number and as a device tensor) included."""
    from dit_accel.kernels import SoftmaxCorrection, ops, refresh_attention

    monkeypatch.setattr(ops, "_CALLS", {})
    plan = _random_plan(1, 2, 70, 70, 16, 0.5, seed=2)
    q, k, v = _qkv(1, 70, 2, 32, torch.float16, "bshd", seed=3)
    _, _, corr = refresh_attention(q, k, v, plan, backend="triton")
    offset_t = torch.full((1,), 0.25, dtype=torch.float32, device=DEVICE)
    options = [{}, {"correction": corr, "rho_offset": 0.5}, {"correction": corr, "rho_offset": offset_t}]
    for kwargs in options:
        for _ in range(2):  # the first call of a key may tune; the next one records
            block_sparse_attention(q, k, v, plan, backend="triton", **kwargs)
    sparse_keys = lambda: [key for key in ops._CALLS if key[0] != "refresh"]  # noqa: E731
    assert len(sparse_keys()) == len(options)

    def refuse(*a, **kw):
        raise AssertionError("a cached call ran the checks")

    q2, k2, v2 = _qkv(1, 70, 2, 32, torch.float16, "bshd", seed=4)
    corr2 = SoftmaxCorrection(corr.rho * 0.5, corr.residual * 2)
    for kwargs in options:
        if "correction" in kwargs:
            kwargs = {**kwargs, "correction": corr2}
        want = _uncached(monkeypatch, q2, k2, v2, plan, backend="triton", **kwargs)
        with monkeypatch.context() as m:
            m.setattr(ops, "_check_inputs", refuse)
            out, lse = block_sparse_attention(q2, k2, v2, plan, backend="triton", **kwargs)
        torch.testing.assert_close(out, want[0], atol=0, rtol=0)
        torch.testing.assert_close(lse, want[1], atol=0, rtol=0)
        assert out.shape == want[0].shape and out.stride() == want[0].stride()
    assert len(sparse_keys()) == len(options)


def _assert_same_refresh(got, want, name: str) -> None:
    """Two refresh_attention results bit-identical: output (with its strides), LSE and every statistic."""
    (out, lse, corr), (w_out, w_lse, w_corr) = got, want
    assert out.shape == w_out.shape and out.stride() == w_out.stride(), name
    torch.testing.assert_close(out, w_out, atol=0, rtol=0, msg=name)
    torch.testing.assert_close(lse, w_lse, atol=0, rtol=0, msg=name)
    assert corr.tensors().keys() == w_corr.tensors().keys(), name
    for key, t in corr.tensors().items():
        w = w_corr.tensors()[key]
        assert t.dtype == w.dtype and t.shape == w.shape, f"{name}: {key}"
        torch.testing.assert_close(t.float(), w.float(), atol=0, rtol=0, msg=f"{name}: {key}")


@pytest.mark.interpret
def test_repeated_refresh_calls_replay_the_recorded_launch(monkeypatch):
    """refresh_attention caches its launch like block_sparse_attention: a repeat with new q, k, v skips the
    checks and is bit-identical to an uncached call, for each residual dtype (float8 with its row scales) and
    both layouts; each residual dtype is its own entry, and a refresh key never serves a sparse call."""
    from dit_accel.kernels import ops, refresh_attention

    monkeypatch.setattr(ops, "_CALLS", {})
    plan = _random_plan(1, 2, 70, 70, 16, 0.5, seed=2)

    def refuse(*a, **kw):
        raise AssertionError("a cached call ran the checks")

    cases = [(None, "bshd"), (torch.float8_e4m3fn, "bshd"), (torch.float32, "bhsd")]
    for i, (rdtype, layout) in enumerate(cases):
        for seed in (3, 4):  # the first call of a key may tune; the next one records
            refresh_attention(*_qkv(1, 70, 2, 32, torch.float16, layout, seed=seed), plan, layout=layout,
                              backend="triton", residual_dtype=rdtype)  # fmt: skip
        assert len(ops._CALLS) == i + 1, f"{rdtype}: not recorded"
        fresh = _qkv(1, 70, 2, 32, torch.float16, layout, seed=5)
        want = _uncached(
            monkeypatch,
            *fresh,
            plan,
            op=refresh_attention,
            layout=layout,
            backend="triton",
            residual_dtype=rdtype,
        )
        with monkeypatch.context() as m:
            m.setattr(ops, "_check_inputs", refuse)
            got = refresh_attention(*fresh, plan, layout=layout, backend="triton", residual_dtype=rdtype)
        _assert_same_refresh(got, want, f"{rdtype} {layout}")
    assert all(key[0] == "refresh" for key in ops._CALLS)
    from dit_accel.kernels import triton_refresh  # the walk threshold is part of the key

    qkv = _qkv(1, 70, 2, 32, torch.float16, "bshd", seed=3)
    monkeypatch.setattr(triton_refresh, "MASKED_WALK_MAX_BLOCK", triton_refresh.MASKED_WALK_MAX_BLOCK + 1)
    for _ in range(2):
        refresh_attention(*qkv, plan, backend="triton")
    assert len(ops._CALLS) == len(cases) + 1
    q, k, v = _qkv(1, 70, 2, 32, torch.float16, "bshd", seed=6)
    out, _ = block_sparse_attention(q, k, v, plan, backend="triton")
    torch.testing.assert_close(
        out, _uncached(monkeypatch, q, k, v, plan, backend="triton")[0], atol=0, rtol=0
    )


@pytest.mark.interpret
def test_call_cache_keys_on_everything_the_launch_reads(monkeypatch):
    """Another stride, alignment, dtype, layout or plan object is another entry, never a wrong reuse; a plan
    that died is a miss; a call whose k is its v (one data pointer, two roles) is not cached."""
    import gc

    from dit_accel.kernels import ops

    monkeypatch.setattr(ops, "_CALLS", {})
    s, h, d = 70, 2, 32
    buf = torch.randn(3, s * h * d + 8, generator=torch.Generator().manual_seed(7)).half().to(DEVICE)
    aligned = [buf[i, : s * h * d].view(1, s, h, d) for i in range(3)]
    misaligned = [buf[i, 1 : s * h * d + 1].view(1, s, h, d) for i in range(3)]
    fused = _qkv(1, s, h, d, torch.float16, "bshd", seed=8, noncontig=True)
    plan = _random_plan(1, h, s, s, 16, 0.5, seed=2)
    cases = {
        "aligned": (aligned, plan, "bshd"),
        "misaligned": (misaligned, plan, "bshd"),
        "fused": (list(fused), plan, "bshd"),
        "bf16": ([t.bfloat16() for t in aligned], plan, "bshd"),
        "bhsd": ([t.transpose(1, 2) for t in aligned], plan, "bhsd"),
        "other plan": (aligned, _random_plan(1, h, s, s, 16, 0.5, seed=9), "bshd"),
    }
    for name, (qkv, p, layout) in cases.items():
        for _ in range(3):
            out, lse = block_sparse_attention(*qkv, p, layout=layout, backend="triton")
        want = _uncached(monkeypatch, *qkv, p, layout=layout, backend="triton")
        torch.testing.assert_close(out, want[0], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(lse, want[1], atol=0, rtol=0, msg=name)
    assert len(ops._CALLS) == len(cases)

    q, k, _ = aligned
    for _ in range(2):
        block_sparse_attention(q, k, k, plan, backend="triton")
    assert len(ops._CALLS) == len(cases)  # k is v: not cached

    dying = _random_plan(1, h, s, s, 16, 0.3, seed=10)
    for _ in range(2):
        block_sparse_attention(*aligned, dying, backend="triton")
    (entry,) = [c for key, c in ops._CALLS.items() if key[0] == id(dying)]
    del dying
    gc.collect()
    assert entry.plan() is None


@pytest.mark.interpret
def test_repeated_dense_calls_replay_the_recorded_launch(monkeypatch):
    """dense_attention's Triton loop replays its recorded launch too (with and without the LSE, both
    layouts), bit-identical to an uncached call; a torch-backend call is never stored."""
    from dit_accel.kernels import dense_attention, ops

    monkeypatch.setattr(ops, "_CALLS", {})

    def refuse(*a, **kw):
        raise AssertionError("a cached call ran the checks")

    cases = [(True, "bshd"), (False, "bshd"), (True, "bhsd")]
    for i, (lse, layout) in enumerate(cases):
        for seed in (3, 4):  # the first call of a key may tune; the next one records
            dense_attention(*_qkv(1, 70, 2, 32, torch.float16, layout, seed=seed), layout=layout,
                            backend="triton", return_lse=lse)  # fmt: skip
        assert len(ops._CALLS) == i + 1, f"{lse} {layout}: not recorded"
        fresh = _qkv(1, 70, 2, 32, torch.float16, layout, seed=5)
        kw = {"layout": layout, "backend": "triton", "return_lse": lse}
        want = _uncached(monkeypatch, *fresh, op=dense_attention, **kw)
        with monkeypatch.context() as m:
            m.setattr(ops, "_check_inputs", refuse)
            got = dense_attention(*fresh, **kw)
        for g, w in zip(got, want) if lse else [(got, want)]:
            assert g.shape == w.shape and g.stride() == w.stride()
            torch.testing.assert_close(g, w, atol=0, rtol=0)
    assert all(key[0] == "dense" for key in ops._CALLS)
    dense_attention(*_qkv(1, 70, 2, 32, torch.float32, "bshd"), backend="torch")
    dense_attention(*_qkv(1, 70, 2, 32, torch.float32, "bshd"), backend="torch")
    assert len(ops._CALLS) == len(cases)


@pytest.mark.interpret
def test_repeated_mask_statistics_calls_replay_the_recorded_launch(monkeypatch):
    """mask_statistics caches its launch too: a repeat with new q, k, v and a new dense pass skips the checks
    and is bit-identical to an uncached call, per residual dtype and layout."""
    from dit_accel.kernels import dense_attention, mask_statistics, ops

    monkeypatch.setattr(ops, "_CALLS", {})
    plan = _random_plan(1, 2, 70, 70, 16, 0.5, seed=2)

    def refuse(*a, **kw):
        raise AssertionError("a cached call ran the checks")

    def inputs(layout, seed):
        q, k, v = _qkv(1, 70, 2, 32, torch.float16, layout, seed=seed)
        out, lse = dense_attention(q, k, v, layout=layout, backend="torch")
        return q, k, v, plan, out.half(), lse

    cases = [(None, "bshd"), (torch.float8_e4m3fn, "bshd"), (torch.float32, "bhsd")]
    for i, (rdtype, layout) in enumerate(cases):
        for seed in (3, 4):  # the first call of a key may tune; the next one records
            mask_statistics(*inputs(layout, seed), layout=layout, backend="triton", residual_dtype=rdtype)
        assert len(ops._CALLS) == i + 1, f"{rdtype}: not recorded"
        fresh = inputs(layout, 5)
        kw = {"layout": layout, "backend": "triton", "residual_dtype": rdtype}
        want = _uncached(monkeypatch, *fresh, op=mask_statistics, **kw)
        with monkeypatch.context() as m:
            m.setattr(ops, "_check_inputs", refuse)
            got = mask_statistics(*fresh, **kw)
        assert got.tensors().keys() == want.tensors().keys()
        for key, t in got.tensors().items():
            w = want.tensors()[key]
            assert t.dtype == w.dtype and t.shape == w.shape, key
            torch.testing.assert_close(t.float(), w.float(), atol=0, rtol=0, msg=f"{rdtype} {layout}: {key}")
    assert all(key[0] == "stats" for key in ops._CALLS)


@pytest.mark.gpu
def test_gpu_cached_calls_match_uncached(monkeypatch):
    """On the GPU (direct launches where Triton's version allows), replayed calls are bit-identical to
    uncached ones: aligned and misaligned views, another batch size, corrected calls with a device rho
    offset, refresh, block_mass, mask_statistics and dense calls, and a replay captured in a CUDA graph."""
    from dit_accel.kernels import dense_attention, mask_statistics, ops, refresh_attention

    monkeypatch.setattr(ops, "_CALLS", {})
    s, h, d = 1000, 4, 64
    plan = _random_plan(2, h, s, s, 128, 0.4, seed=6)
    plan1 = _random_plan(1, h, s, s, 128, 0.4, seed=6)

    def cases(buf):  # the same views of another buffer: same strides and alignments, other data
        return {
            "aligned": ([buf[i, :, : s * h * d].view(2, s, h, d) for i in range(3)], plan),
            "misaligned": ([buf[i, :, 1 : s * h * d + 1].view(2, s, h, d) for i in range(3)], plan),
            "batch1": ([buf[i, :1, : s * h * d].view(1, s, h, d) for i in range(3)], plan1),
        }

    first = cases(torch.randn(3, 2, s * h * d + 8, device="cuda").to(torch.bfloat16))
    fresh = cases(torch.randn(3, 2, s * h * d + 8, device="cuda").to(torch.bfloat16))
    _, _, corr = refresh_attention(*first["aligned"][0], plan, backend="triton")
    offset = torch.full((1,), 0.1, dtype=torch.float32, device="cuda")
    for name, (qkv, p) in first.items():
        kwargs = {"correction": corr, "rho_offset": offset} if name == "aligned" else {}
        for _ in range(2):
            block_sparse_attention(*qkv, p, backend="triton", **kwargs)
        assert len(ops._CALLS) == list(first).index(name) + 1, name
        out, lse = block_sparse_attention(*fresh[name][0], p, backend="triton", **kwargs)
        assert len(ops._CALLS) == list(first).index(name) + 1, f"{name}: the fresh call was not a hit"
        want = _uncached(monkeypatch, *fresh[name][0], p, backend="triton", **kwargs)
        torch.testing.assert_close(out, want[0], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(lse, want[1], atol=0, rtol=0, msg=name)

    for name, (qkv, p) in first.items():  # refresh calls: recorded, then replayed with the fresh tensors
        for _ in range(2):
            refresh_attention(*qkv, p, backend="triton")
        got = refresh_attention(*fresh[name][0], p, backend="triton")
        _assert_same_refresh(
            got, _uncached(monkeypatch, *fresh[name][0], p, op=refresh_attention, backend="triton"), name
        )
    assert sum(key[0] == "refresh" for key in ops._CALLS) == len(first)
    for name, (qkv, _) in first.items():  # block_mass calls: recorded, then replayed with the fresh tensors
        lse = torch.randn(qkv[0].shape[0], h, s, device="cuda") + 4.0
        for _ in range(2):
            block_mass(qkv[0], qkv[1], lse, 128, 128, backend="triton")
        q2, k2 = fresh[name][0][:2]
        got = block_mass(q2, k2, lse * 0.5, 128, 128, backend="triton")
        want = _uncached(monkeypatch, q2, k2, lse * 0.5, 128, 128, op=block_mass, backend="triton")
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
    assert sum(key[0] == "mass" for key in ops._CALLS) == len(first)
    for name, (qkv, p) in first.items():  # mask_statistics calls: recorded, then replayed with fresh tensors
        for _ in range(2):
            mask_statistics(*qkv, p, *dense_attention(*qkv, backend="triton"), backend="triton")
        fresh_qkv = fresh[name][0]
        out, lse = dense_attention(*fresh_qkv, backend="triton")
        got = mask_statistics(*fresh_qkv, p, out, lse, backend="triton")
        want = _uncached(monkeypatch, *fresh_qkv, p, out, lse, op=mask_statistics, backend="triton")
        for key, t in got.tensors().items():
            torch.testing.assert_close(t, want.tensors()[key], atol=0, rtol=0, msg=f"{name}: {key}")
    assert sum(key[0] == "stats" for key in ops._CALLS) == len(first)
    for name, (qkv, _) in first.items():  # dense_attention on our Triton loop: recorded, then replayed
        for _ in range(2):
            dense_attention(*qkv, backend="triton")
        got = dense_attention(*fresh[name][0], backend="triton")
        want = _uncached(monkeypatch, *fresh[name][0], op=dense_attention, backend="triton")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0, msg=name)
    assert sum(key[0] == "dense" for key in ops._CALLS) == len(first)

    q, k, v = fresh["aligned"][0]
    block_sparse_attention(q, k, v, plan, backend="triton")  # a cached key: the capture replays it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = block_sparse_attention(q, k, v, plan, backend="triton")
    for t in (q, k, v):
        t.mul_(0.25)
    graph.replay()
    want = _uncached(monkeypatch, q, k, v, plan, backend="triton")
    torch.testing.assert_close(captured, want[0], atol=0, rtol=0)


@pytest.mark.interpret
def test_repeated_block_mass_calls_replay_the_recorded_launch(monkeypatch):
    """block_mass caches its launch like the attention ops: a repeat with new q, k and LSE skips the checks
    and is bit-identical to an uncached call, in both layouts; other block sizes are another entry."""
    from dit_accel.kernels import ops

    monkeypatch.setattr(ops, "_CALLS", {})

    def refuse(*a, **kw):
        raise AssertionError("a cached call ran the checks")

    cases = [("bshd", 16, 16), ("bhsd", 16, 16), ("bshd", 32, 16)]
    for i, (layout, bq, bk) in enumerate(cases):
        for seed in (3, 4):  # the first call of a key may tune; the next one records
            q, k, _ = _qkv(1, 70, 2, 32, torch.float16, layout, seed=seed)
            lse = torch.randn(1, 2, 70, generator=torch.Generator().manual_seed(seed)).to(DEVICE) + 3.0
            block_mass(q, k, lse, bq, bk, layout=layout, backend="triton")
        assert len(ops._CALLS) == i + 1, f"{layout} {bq}x{bk}: not recorded"
        q, k, _ = _qkv(1, 70, 2, 32, torch.float16, layout, seed=5)
        lse = torch.randn(1, 2, 70, generator=torch.Generator().manual_seed(5)).to(DEVICE) + 3.0
        want = _uncached(monkeypatch, q, k, lse, bq, bk, op=block_mass, layout=layout, backend="triton")
        with monkeypatch.context() as m:
            m.setattr(ops, "_check_inputs", refuse)
            got = block_mass(q, k, lse, bq, bk, layout=layout, backend="triton")
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert all(key[0] == "mass" for key in ops._CALLS)


@pytest.mark.interpret
def test_repeated_rotary_calls_replay_the_recorded_launch(monkeypatch):
    """rotary_interleaved caches its Triton launch the same way: a repeat with new tensors (and new tables) is
    bit-identical to an uncached call; another table layout is another entry."""
    from dit_accel.kernels import ops, rotary_interleaved

    monkeypatch.setattr(ops, "_CALLS", {})
    g = torch.Generator().manual_seed(11)

    def inputs(table_batch=1):
        q, k = (torch.randn(2, 24, 3, 16, generator=g).half().to(DEVICE) for _ in range(2))
        angles = torch.randn(table_batch, 24, 1, 8, generator=g).repeat_interleave(2, dim=-1)
        return q, k, angles.cos().to(DEVICE), angles.sin().to(DEVICE)

    for table_batch in (1, 2):
        for _ in range(2):
            rotary_interleaved(*inputs(table_batch), backend="triton")
        fresh = inputs(table_batch)
        got = rotary_interleaved(*fresh, backend="triton")
        monkeypatch.setattr(ops, "_CALL_CACHE", False)
        want = rotary_interleaved(*fresh, backend="triton")
        monkeypatch.setattr(ops, "_CALL_CACHE", True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(ops._CALLS) == 2
