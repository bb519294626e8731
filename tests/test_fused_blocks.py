"""fuse_blocks: a transformer block's elementwise work in one Triton pass per step (kernels.block_step) and
Wan's fused block forward, against the eager arithmetic they replace. On the CPU the kernel runs in Triton's
interpreter, in float16 (the interpreter rounds float32 to bfloat16 differently from the GPU)."""

from __future__ import annotations

import pytest
import torch
from _tiny import wan

import dit_accel
from dit_accel._diffusers import HookRegistry, ModelHook, hook_registry
from dit_accel.kernels import block_step
from dit_accel.kernels import reference as R
from dit_accel.processors import wan as wan_processors

CASES = [(r, n) for r in ("none", "add", "gated") for n in (None, "modulate", "affine")]


def _operands(batch=2, seq=7, d=40, dtype=torch.float16, per_batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d, generator=g).to(dtype)
    y = torch.randn(batch, seq, d, generator=g).to(dtype)
    # (table + temb.float()).chunk(6, dim=1): [B, 1, D] float32 views with a batch stride of 6 D
    mod = torch.randn(per_batch, 6, d, generator=g)
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    weight = torch.randn(d, generator=g).to(dtype)
    bias = torch.randn(d, generator=g).to(dtype)
    return x, y, gate, dict(scale=scale, shift=shift, weight=weight, bias=bias, eps=1e-6)


@pytest.mark.parametrize("residual,norm", CASES)
@pytest.mark.parametrize("per_batch", [2, 1])
def test_block_step_matches_the_eager_arithmetic(residual, norm, per_batch):
    x, y, gate, kw = _operands(per_batch=per_batch)
    h, n = block_step(x, y, gate, residual=residual, norm=norm, backend="triton", **kw)
    h_ref, n_ref = R.block_step_reference(x, y, gate, residual=residual, norm=norm, **kw)
    assert h.dtype == x.dtype and torch.equal(h, h_ref)
    if norm is None:
        assert n is None and n_ref is None
    else:
        assert n.dtype == x.dtype
        # the LayerNorm's sums run in another order: at most the last bit of float16
        torch.testing.assert_close(n, n_ref, rtol=2e-3, atol=2e-3)


def test_block_step_reference_is_wans_block_code():
    """The reference is the arithmetic of WanTransformerBlock.forward (diffusers 0.42), step by step."""
    from diffusers.models.normalization import FP32LayerNorm

    x, y, gate, kw = _operands(dtype=torch.bfloat16)
    d = x.shape[-1]
    norm1 = FP32LayerNorm(d, 1e-6, elementwise_affine=False)
    norm2 = FP32LayerNorm(d, 1e-6, elementwise_affine=True).to(torch.bfloat16)
    with torch.no_grad():
        norm2.weight.copy_(kw["weight"].to(torch.bfloat16))
        norm2.bias.copy_(kw["bias"].to(torch.bfloat16))
    scale, shift = kw["scale"], kw["shift"]
    k = dict(kw, weight=norm2.weight, bias=norm2.bias)
    stock = (norm1(x.float()) * (1 + scale) + shift).type_as(x)
    assert torch.equal(R.block_step_reference(x, norm="modulate", **k)[1], stock)
    stock = (x.float() + y * gate).type_as(x)
    assert torch.equal(R.block_step_reference(x, y, gate, residual="gated", **k)[0], stock)
    assert torch.equal(R.block_step_reference(x, norm="affine", **k)[1], norm2(x.float()).type_as(x))
    assert torch.equal(R.block_step_reference(x, y, residual="add", **k)[0], x + y)


def test_block_step_rejects_bad_arguments():
    x, y, gate, kw = _operands()
    with pytest.raises(ValueError, match="residual must be"):
        block_step(x, y, gate, residual="mul")
    with pytest.raises(ValueError, match="norm must be"):
        block_step(x, norm="rms")
    with pytest.raises(ValueError, match="backend must be"):
        block_step(x, backend="cuda")
    with pytest.raises(ValueError, match="gate is required"):
        block_step(x, y, residual="gated")
    with pytest.raises(ValueError, match="needs y"):
        block_step(x, y[:, :3], residual="add")
    with pytest.raises(ValueError, match=r"scale must be \[B or 1, 1, 40\]"):
        block_step(x, norm="modulate", scale=kw["scale"][..., :8], shift=kw["shift"])
    with pytest.raises(ValueError, match="needs weight"):
        block_step(x, norm="affine", bias=kw["bias"])
    with pytest.raises(ValueError, match="weight is on meta, x on cpu"):
        block_step(x, norm="affine", weight=kw["weight"].to("meta"), bias=kw["bias"])


def _count_steps(monkeypatch) -> list:
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("residual", "none"))
        return block_step(*args, **kwargs)

    monkeypatch.setattr(wan_processors, "block_step", counted)
    return calls


def _half_wan():
    model, inputs = wan()
    model = model.to(torch.float16)
    kw = inputs(2)
    kw = {k: v.to(torch.float16) if v.is_floating_point() and k != "timestep" else v for k, v in kw.items()}
    return model, kw


def test_wan_fused_blocks_match_stock(monkeypatch):
    model, kw = _half_wan()
    with torch.no_grad():
        stock = model(**kw, return_dict=False)[0]
    calls = _count_steps(monkeypatch)
    handle = dit_accel.apply(model, method="dense", fuse_blocks=True)
    with torch.no_grad():
        fused = model(**kw, return_dict=False)[0]
    # four steps a block (the norm before self-attention, two gated residuals, the cross-attention's add)
    assert calls == ["none", "gated", "add", "gated"] * len(model.blocks)
    torch.testing.assert_close(fused, stock, rtol=0, atol=5e-3)
    handle.remove()
    for block in model.blocks:
        assert hook_registry(block) is None and "forward" not in block.__dict__
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(**kw, return_dict=False)[0], stock)
    assert calls == []


class _Count(ModelHook):
    def __init__(self):
        super().__init__()
        self.n = 0

    def new_forward(self, module, *args, **kwargs):
        self.n += 1
        return self.fn_ref.original_forward(*args, **kwargs)


def test_a_block_hook_registered_before_apply_stays_in_charge(monkeypatch):
    """A hook on a block from before apply (a step cache that may skip the block) keeps running; the block
    beneath it runs its stock forward. One registered after apply wraps the fused forward."""
    model, kw = _half_wan()
    before, after = _Count(), _Count()
    HookRegistry.check_if_exists_or_initialize(model.blocks[0]).register_hook(before, "before")
    calls = _count_steps(monkeypatch)
    handle = dit_accel.apply(model, method="dense", fuse_blocks=True)
    HookRegistry.check_if_exists_or_initialize(model.blocks[1]).register_hook(after, "after")
    with torch.no_grad():
        model(**kw, return_dict=False)
    assert before.n == 1 and after.n == 1
    assert len(calls) == 4 * (len(model.blocks) - 1)  # block 0 ran stock
    handle.remove()
    assert list(hook_registry(model.blocks[0]).hooks) == ["before"]
    # diffusers' remove_hook would unlink "after"'s new_forward: the fused hook stays as a pass-through
    assert list(hook_registry(model.blocks[1]).hooks) == ["dit_accel_fused_block", "after"]
    calls.clear()
    with torch.no_grad():
        model(**kw, return_dict=False)
    assert before.n == 2 and after.n == 2 and calls == []


def test_fuse_blocks_off_by_default_and_checked(monkeypatch):
    model, kw = _half_wan()
    calls = _count_steps(monkeypatch)
    handle = dit_accel.apply(model, method="dense")
    with torch.no_grad():
        model(**kw, return_dict=False)
    assert calls == []
    handle.remove()
    with pytest.raises(ValueError, match="fuse_blocks must be a bool"):
        dit_accel.apply(model, method="dense", fuse_blocks="yes")


def test_fuse_blocks_on_a_family_without_them_logs_and_runs(caplog):
    from _tiny import flux

    model, inputs = flux()
    with caplog.at_level("INFO", logger="dit_accel"):
        handle = dit_accel.apply(model, method="dense", fuse_blocks=True)
    assert "no block of FluxTransformer2DModel has a fused forward" in caplog.text
    with torch.no_grad():
        model(**inputs(1), return_dict=False)
    handle.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("residual,norm", CASES)
def test_gpu_block_step_bf16(residual, norm):
    """bf16 on the GPU at Wan-1.3B's hidden size: residuals bit-exact, the norm within one bf16 step."""
    x, y, gate, kw = _operands(batch=1, seq=3001, d=1536, dtype=torch.bfloat16, per_batch=1)
    x, y, gate = x.cuda(), y.cuda(), gate.cuda()
    kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    h, n = block_step(x, y, gate, residual=residual, norm=norm, backend="triton", **kw)
    h_ref, n_ref = R.block_step_reference(x, y, gate, residual=residual, norm=norm, **kw)
    assert torch.equal(h, h_ref)
    if norm is not None:
        step = n_ref.float().abs().clamp_min(1.0) * 2.0**-7  # one bf16 step at the value's magnitude
        assert ((n.float() - n_ref.float()).abs() <= step).all()
        assert (n != n_ref).float().mean().item() < 1e-3


def test_norm_weights_elsewhere_run_the_stock_block(monkeypatch):
    """A block whose norm2 weights are not on the hidden states' device (leaf-level offloading places them
    when norm2 itself is called) runs the stock forward, which calls norm2."""
    model, kw = _half_wan()
    calls = _count_steps(monkeypatch)
    handle = dit_accel.apply(model, method="dense", fuse_blocks=True)
    block = model.blocks[0]
    real = block.norm2.weight
    seen = []

    def place(module, args):  # as an onloading hook would: the weights arrive when the module is called
        seen.append(module.weight.device.type)
        module.weight = real

    block.norm2.weight = torch.nn.Parameter(real.detach().to("meta"), requires_grad=False)
    hook = block.norm2.register_forward_pre_hook(place)
    with torch.no_grad():
        model(**kw, return_dict=False)
    hook.remove()
    handle.remove()
    assert seen == ["meta"] and len(calls) == 4 * (len(model.blocks) - 1)
