"""``dit_accel.kernels.rotary_interleaved``: RoPE on q and k in one Triton pass, against the stock arithmetic
of its two conventions: ``reference.rotary_interleaved_reference`` (the code of diffusers' Wan processor) and
``reference.rotary_pairs_reference`` (``diffusers.models.embeddings.apply_rotary_emb``, HunyuanVideo and Flux;
the reference itself is checked against diffusers' function).

The Triton kernel must be bit-exact with the reference for every table dtype: on the GPU that is asserted
exactly. Triton's CPU interpreter truncates float32 to bfloat16 instead of rounding to nearest, so on the CPU
bfloat16 results may differ by one unit in the last place of a product; float16 is exact there too."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from dit_accel.kernels import rotary_interleaved
from dit_accel.kernels.reference import rotary_interleaved_reference as reference
from dit_accel.kernels.reference import rotary_pairs_reference

SHAPES = [
    pytest.param((1, 7, 3, 8), id="S7-H3-D8"),
    pytest.param((2, 5, 5, 6), id="B2-S5-H5-D6"),
    pytest.param((1, 9, 12, 128), id="S9-H12-D128"),
    pytest.param((1, 3, 2, 72), id="S3-D72"),
]
# The kernel runs compiled on a GPU, else in Triton's interpreter on the CPU (conftest sets it).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(shape, dtype, table_dtype, device=DEVICE, batch_tables=False, seed=0):
    b, s, h, d = shape
    g = torch.Generator().manual_seed(seed)
    # q as the stock processor has it: heads split from a [B, S, H*D] projection; k a strided view
    q = torch.randn(b, s, h * d, generator=g).to(device, dtype).unflatten(2, (h, -1))
    k = torch.randn(b, s, 2 * h * d, generator=g).to(device, dtype)[..., : h * d].unflatten(2, (h, -1))
    angle = torch.randn(b if batch_tables else 1, s, 1, d // 2, generator=g).double().repeat_interleave(2, -1)
    return q, k, angle.cos().to(device, table_dtype), angle.sin().to(device, table_dtype)


def _check(q, k, cos, sin, exact: bool):
    out_q, out_k = rotary_interleaved(q, k, cos, sin, backend="triton")
    for out, x in ((out_q, q), (out_k, k)):
        ref = reference(x, cos, sin)
        assert out.dtype == x.dtype and out.shape == x.shape
        if exact:
            assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
        else:  # truncated roundings: one bfloat16 ulp of the products (|x cos| < 4 here: 2^-5)
            torch.testing.assert_close(out.float(), ref.float(), atol=2**-5, rtol=2**-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", ["same", torch.float32, torch.float64])
def test_triton_matches_the_stock_arithmetic(shape, dtype, table_dtype):
    table_dtype = dtype if table_dtype == "same" else table_dtype
    q, k, cos, sin = _inputs(shape, dtype, table_dtype)
    _check(q, k, cos, sin, exact=dtype == torch.float16 or DEVICE == "cuda")


def test_tables_per_batch_and_broadcast_views():
    q, k, cos, sin = _inputs((2, 5, 3, 16), torch.float16, torch.float32, batch_tables=True)
    _check(q, k, cos, sin, exact=True)
    q, k, cos, sin = _inputs((2, 5, 3, 16), torch.float16, torch.float32)
    _check(q, k, cos.expand(2, -1, -1, -1), sin.expand(2, -1, -1, -1), exact=True)  # zero batch stride


def test_backends_and_refusals(caplog):
    q, k, cos, sin = _inputs((1, 4, 2, 8), torch.float32, torch.float32)
    out_q, out_k = rotary_interleaved(q, k, cos, sin)  # auto: float32 q goes to the reference
    assert torch.equal(out_q, reference(q, cos, sin)) and torch.equal(out_k, reference(k, cos, sin))
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: dtype torch.float32"):
        rotary_interleaved(q, k, cos, sin, backend="triton")
    q, k, cos, sin = _inputs((1, 4, 2, 8), torch.float16, torch.float32)
    for backend in ("triton", "torch"):  # shapes are checked on every backend
        with pytest.raises(ValueError, match=r"cos must be \[1 or B, 4, 1, 8\] \(rotated tokens, 1, D\)"):
            rotary_interleaved(q, k, cos[:, :3], sin, backend=backend)
    with pytest.raises(ValueError, match=r"rotary_len must lie in \[0, S=4\], got 5"):
        rotary_interleaved(q, k, cos, sin, rotary_len=5)
    with pytest.raises(ValueError, match="convention must be one of"):
        rotary_interleaved(q, k, cos, sin, convention="flux")
    with pytest.raises(ValueError, match="backend must be one of"):
        rotary_interleaved(q, k, cos, sin, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("table_dtype", ["same", torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_bit_exact_at_wan_shape(dtype, table_dtype):
    """Wan2.1-1.3B 480p: 32,760 tokens, 12 heads of 128."""
    table_dtype = dtype if table_dtype == "same" else table_dtype
    q, k, cos, sin = _inputs((1, 32760, 12, 128), dtype, table_dtype, device="cuda")
    _check(q, k, cos, sin, exact=True)


# ------------------------------------------------- the apply_rotary_emb convention (HunyuanVideo, Flux)


def _pair_tables(s, d, table_dtype, device=DEVICE, seed=1):
    # Unlike diffusers' tables (each value repeated for both elements of a pair), every entry differs: a
    # kernel that read one entry per pair, as the Wan convention does, would fail.
    g = torch.Generator().manual_seed(seed)
    angle = torch.randn(s, d, generator=g).double()
    return angle.cos().to(device, table_dtype), angle.sin().to(device, table_dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("table_dtype", ["same", torch.float32, torch.float64])
def test_pairs_reference_is_diffusers_apply_rotary_emb(dtype, table_dtype):
    table_dtype = dtype if table_dtype == "same" else table_dtype
    q, _, _, _ = _inputs((2, 6, 3, 16), dtype, torch.float32, device="cpu")
    cos, sin = _pair_tables(6, 16, table_dtype, device="cpu")
    want = apply_rotary_emb(q, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
    assert torch.equal(rotary_pairs_reference(q, cos[None, :, None], sin[None, :, None]), want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("table_dtype", ["same", torch.float32, torch.float64])
def test_triton_matches_apply_rotary_emb(shape, dtype, table_dtype):
    table_dtype = dtype if table_dtype == "same" else table_dtype
    b, s, h, d = shape
    q, k, _, _ = _inputs(shape, dtype, torch.float32)
    cos, sin = _pair_tables(s, d, table_dtype)
    cos, sin = cos[None, :, None], sin[None, :, None]
    out_q, out_k = rotary_interleaved(q, k, cos, sin, backend="triton", convention="apply_rotary_emb")
    for out, x in ((out_q, q), (out_k, k)):
        ref = rotary_pairs_reference(x, cos, sin)
        assert out.dtype == x.dtype and out.shape == x.shape
        if dtype == torch.float16 or DEVICE == "cuda":
            assert torch.equal(out, ref), (out.float() - ref.float()).abs().max()
        else:  # the interpreter truncates the final float32 -> bfloat16 rounding: one bfloat16 ulp
            torch.testing.assert_close(out.float(), ref.float(), atol=2**-5, rtol=2**-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("convention", ["wan", "apply_rotary_emb"])
def test_rotary_len_rotates_a_prefix_and_copies_the_rest(backend, convention):
    """HunyuanVideo's single-stream blocks: the video tokens rotated, the text suffix as it was."""
    q, k, _, _ = _inputs((2, 9, 3, 16), torch.float16, torch.float32)
    cos, sin = _pair_tables(6, 16, torch.float32)
    cos, sin = cos[None, :, None], sin[None, :, None]
    ref = reference if convention == "wan" else rotary_pairs_reference
    out_q, out_k = rotary_interleaved(q, k, cos, sin, backend, convention=convention, rotary_len=6)
    for out, x in ((out_q, q), (out_k, k)):
        assert torch.equal(out[:, 6:], x[:, 6:])
        assert torch.equal(out[:, :6], ref(x[:, :6], cos, sin))
    none_q, _ = rotary_interleaved(q, k, cos[:, :0], sin[:, :0], backend, convention=convention, rotary_len=0)
    assert torch.equal(none_q, q)


@pytest.mark.gpu
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.float64])
def test_gpu_bit_exact_at_hunyuan_shape(table_dtype):
    """HunyuanVideo 720p 129f single-stream block: 118,800 video tokens rotated, 256 text tokens copied, 24
    heads of 128."""
    video, text = 118800, 256
    q, k, _, _ = _inputs((1, video + text, 24, 128), torch.bfloat16, torch.float32, device="cuda")
    cos, sin = _pair_tables(video, 128, table_dtype, device="cuda")
    cos, sin = cos[None, :, None], sin[None, :, None]
    out_q, out_k = rotary_interleaved(
        q, k, cos, sin, "triton", convention="apply_rotary_emb", rotary_len=video
    )
    for out, x in ((out_q, q), (out_k, k)):
        want = torch.cat([rotary_pairs_reference(x[:, :video], cos, sin), x[:, video:]], dim=1)
        assert torch.equal(out, want)
