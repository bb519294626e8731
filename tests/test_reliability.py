"""dit_accel with diffusers' own features, and strict input checks (issue 18).

1. gradient checkpointing (every family; dense equals stock, sparse gradients through the plan, replay of the
   forward's plan, Triton refused under grad); 2. IP-adapter load and unload on Flux and SD3; 3. layerwise
   casting (CPU here, the GPU variant marked ``gpu``) and autocast; 4. CPU offload and hooks added after
   ``apply``; 5. BlockPlan and kv_len validation; 7. ``backend="triton"`` without a runtime, ``options`` type,
   pickling. Last, the diffusers names dit_accel mirrors (dit_accel/_diffusers.py).
"""

import copy
import inspect
import io
import logging
import pickle

import diffusers
import pytest
import torch
import torch.nn.functional as F
from _tiny import TRANSFORMERS, flux_pipeline, run_wan, sd3_pipeline, wan_pipeline, wan_transformer

import dit_accel
from dit_accel import _diffusers
from dit_accel.kernels import BlockPlan, block_sparse_attention, dense_attention
from dit_accel.kernels.ops import _warn_once as _log_once_ops
from dit_accel.methods import SparseMethod
from dit_accel.methods.window import window_block_mask
from dit_accel.processors import family_for
from dit_accel.processors.base import SparseAttnProcessorBase, _log_once
from dit_accel.tracking import TRACKER_HOOK_NAME, in_backward

FAMILIES = list(TRANSFORMERS)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernels run (interpreted on CPU)
SPARSE = {"method": "window", "density": 0.5, "block_q": 16, "block_k": 16}


def _forward(model, x):
    with torch.no_grad():
        return model(**x, return_dict=False)[0]


def _grads(model, x, checkpointing: bool, **knobs):
    """Parameter gradients of a squared-output loss; dit_accel applied with ``knobs`` (none: stock)."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    handle = dit_accel.apply(model, **knobs) if knobs else None
    out = model(**x, return_dict=False)[0]
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads, "no parameter received a gradient"
    return grads, handle


def _assert_grads(got, want, exact=True):
    assert got.keys() == want.keys()
    for name in want:
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------------
# 1. gradient checkpointing
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointed_dense_gradients_equal_stock(family):
    model, inputs = TRANSFORMERS[family]()
    x = inputs(1)
    want, _ = _grads(model, x, checkpointing=True)
    model, _ = TRANSFORMERS[family]()
    got, handle = _grads(model, x, checkpointing=True, method="dense")
    _assert_grads(got, want)
    # The recomputation in backward adds no stats records: one call per replaced layer.
    assert len(handle.stats().records) == len(handle.layers)
    assert all(not p._captures for p in _processors(model))


def _processors(model):
    return [
        m.processor
        for m in model.modules()
        if isinstance(getattr(m, "processor", None), SparseAttnProcessorBase)
    ]


class _MaskedSDPA(SparseMethod):
    """Oracle: dense SDPA with the window plan's token mask (autograd through torch's own op)."""

    name = "masked-sdpa"

    def __init__(self, density):
        super().__init__()
        self.density = density

    def attention(self, q, k, v, call):
        mask = window_block_mask(
            call.q_len, call.k_len, 16, 16, self.density, call.text_len, call.text_position
        )
        plan = BlockPlan.from_block_mask(mask[None, None], 16, 16)
        tokens = plan.to_token_mask(call.q_len, call.k_len)
        if call.layout == "bshd":
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=tokens)
            return out.transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=tokens)


@pytest.mark.parametrize("family", ["wan", "flux", "sd3"])
def test_sparse_gradients_through_the_plan(family):
    """window at density 0.5 on the torch backend: checkpointed gradients equal un-checkpointed ones, and both
    equal masked SDPA with the same plan."""
    model, inputs = TRANSFORMERS[family]()
    x = inputs(1)
    plain, handle = _grads(model, x, checkpointing=False, backend="torch", **SPARSE)
    assert all(r["kind"] == "sparse" and r["density"] < 1.0 for r in handle.stats().records)
    model, _ = TRANSFORMERS[family]()
    checkpointed, _ = _grads(model, x, checkpointing=True, backend="torch", **SPARSE)
    _assert_grads(checkpointed, plain)
    model, _ = TRANSFORMERS[family]()
    oracle, _ = _grads(model, x, checkpointing=False, method=_MaskedSDPA(SPARSE["density"]))
    _assert_grads(plain, oracle, exact=False)


class _Alternating(SparseMethod):
    """A window plan whose width changes at every call: a recomputation that built its own plan would
    differ from the forward."""

    name = "alternating"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def reuse_plan(self, entry, call):
        return False

    def plan_for(self, q, k, call):
        self.calls += 1
        density = 0.3 if self.calls % 2 else 1.0
        mask = window_block_mask(call.q_len, call.k_len, 16, 16, density, call.text_len, call.text_position)
        return BlockPlan.from_block_mask(mask[None, None], 16, 16)


def test_recomputation_reuses_the_forward_plan():
    x = TRANSFORMERS["wan"]()[1](1)
    plain, _ = _grads(
        wan_transformer(), x, checkpointing=False, method=_Alternating(), block_q=16, block_k=16
    )
    method = _Alternating()
    model = wan_transformer()
    checkpointed, _ = _grads(
        model, x, checkpointing=True, method=method, block_q=16, block_k=16, backend="torch"
    )
    assert method.calls == 4  # two layers, each planned once in the forward and once more in the replay
    _assert_grads(checkpointed, plain)


@pytest.mark.parametrize("grad_step", [0, 1], ids=["refresh-step", "corrected-step"])
def test_rettention_checkpointed_gradients(grad_step):
    """re-ttention refreshes at step 0 and corrects at step 1; the recomputation replays each from the state
    the forward started from."""
    knobs = {"method": "rettention", "density": 0.5, "per_frame": False, "refresh_every": 2, "dense_steps": 0}
    x = TRANSFORMERS["wan"]()[1](1)

    def run(checkpointing):
        model = wan_transformer()
        if checkpointing:
            model.enable_gradient_checkpointing()
        handle = dit_accel.apply(model, block_q=16, block_k=16, backend="torch", **knobs)
        for step, t in enumerate((900.0, 800.0)):
            xs = {**x, "timestep": torch.tensor([t])}
            if step < grad_step:
                _forward(model, xs)
                continue
            model(**xs, return_dict=False)[0].pow(2).mean().backward()
            break
        kinds = {r["kind"] for r in handle.stats().records if r["step"] == grad_step}
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, kinds

    plain, kinds = run(checkpointing=False)
    assert kinds == {("refresh", "corrected")[grad_step]}, kinds
    checkpointed, _ = run(checkpointing=True)
    _assert_grads(checkpointed, plain)


def test_two_checkpointed_forwards_then_one_backward():
    """Recomputations run in reverse order of their forwards; each replays its own forward."""
    x1 = TRANSFORMERS["wan"]()[1](1)
    x2 = {**x1, "hidden_states": x1["hidden_states"].flip(-1), "timestep": torch.tensor([300.0])}

    def loss(model):
        return sum(model(**x, return_dict=False)[0].pow(2).mean() for x in (x1, x2))

    want_model = wan_transformer()
    dit_accel.apply(want_model, backend="torch", **SPARSE)
    loss(want_model).backward()
    model = wan_transformer()
    model.enable_gradient_checkpointing()
    dit_accel.apply(model, backend="torch", **SPARSE)
    loss(model).backward()
    want = {n: p.grad for n, p in want_model.named_parameters() if p.grad is not None}
    _assert_grads({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, want)


def test_unrecorded_recomputations_raise():
    x = TRANSFORMERS["wan"]()[1](1)
    model = wan_transformer()
    model.enable_gradient_checkpointing()
    dit_accel.apply(model, method="dense")
    loss = model(**x, return_dict=False)[0].pow(2).mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"did not record.*retain_graph=True"):
        loss.backward()
    # Checkpointing a block by hand, without diffusers' flag: the forward is not recorded.
    model = wan_transformer()
    dit_accel.apply(model, method="dense")
    block = model.blocks[0]
    forward = block.forward
    block.forward = lambda *a, **k: torch.utils.checkpoint.checkpoint(forward, *a, use_reentrant=False, **k)
    with pytest.raises(RuntimeError, match="checkpointing applied by other means"):
        model(**x, return_dict=False)[0].pow(2).mean().backward()


def _half_qkv_requiring_grad():
    return [torch.randn(1, 40, 2, 16, dtype=torch.float16, device=DEVICE).requires_grad_() for _ in range(3)]


def test_triton_sparse_call_under_grad_raises():
    q, k, v = _half_qkv_requiring_grad()
    plan = BlockPlan.dense(40, 40, 16, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="no backward.*backend='torch'"):
        block_sparse_attention(q, k, v, plan, backend="triton")
    with pytest.raises(RuntimeError, match="no backward"):
        dense_attention(q, k, v, backend="triton")
    with torch.no_grad():
        block_sparse_attention(q, k, v, plan, backend="triton")
    model, inputs = TRANSFORMERS["wan"]()
    model.enable_gradient_checkpointing()
    dit_accel.apply(model, backend="triton", **SPARSE)
    x = {k: (t.half() if t.is_floating_point() else t).to(DEVICE) for k, t in inputs(1).items()}
    model.to(DEVICE, torch.float16)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: inputs require grad"):
        model(**x, return_dict=False)


def test_auto_backend_under_grad_takes_the_reference(caplog):
    q, k, v = _half_qkv_requiring_grad()
    plan = BlockPlan.dense(40, 40, 16, 16, device=DEVICE)
    _log_once_ops.cache_clear()
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        out, _ = block_sparse_attention(q, k, v, plan, backend="auto")
    assert "falling back to the torch reference: inputs require grad" in caplog.text
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    ref, _ = block_sparse_attention(q, k, v, plan, backend="torch")  # with grad: the reference
    assert torch.equal(out.detach(), ref.detach())


def test_in_backward_is_true_only_during_backward():
    seen = []
    x = torch.ones(2, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: seen.append(in_backward()))
    assert not in_backward()
    y.sum().backward()
    assert seen == [True]


# --------------------------------------------------------------------------------------------------
# 2. IP-adapters
# --------------------------------------------------------------------------------------------------
def _flux_ip_state_dict(transformer, clip_dim=8):
    g = torch.Generator().manual_seed(3)
    cross, hidden = transformer.config.joint_attention_dim, transformer.inner_dim

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    ip = {}
    for i in range(len(transformer.transformer_blocks)):
        for name in ("to_k_ip", "to_v_ip"):
            ip[f"{i}.{name}.weight"], ip[f"{i}.{name}.bias"] = r(hidden, cross), r(hidden)
    image_proj = {
        "proj.weight": r(4 * cross, clip_dim),
        "proj.bias": r(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": image_proj, "ip_adapter": ip}


def _flux_run(pipe, ip: bool):
    model, inputs = TRANSFORMERS["flux"]()
    x = inputs(1)
    x["hidden_states"] = torch.randn(1, 42, 16, generator=torch.Generator().manual_seed(5))
    x["guidance"] = torch.tensor([3.5])
    if ip:
        embeds = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(6))
        x["joint_attention_kwargs"] = {"ip_adapter_image_embeds": [embeds]}
    return _forward(pipe.transformer, x)


def _kinds(transformer):
    return {name: type(p).__name__ for name, p in transformer.attn_processors.items()}


def test_flux_ip_adapter_load_and_unload_after_apply():
    state_dict = _flux_ip_state_dict(flux_pipeline().transformer)
    stock = flux_pipeline()
    base = _flux_run(stock, ip=False)
    stock.load_ip_adapter(
        state_dict, weight_name="ip.safetensors", image_encoder_pretrained_model_name_or_path=None
    )
    ref = _flux_run(stock, ip=True)

    pipe = flux_pipeline()
    handle = dit_accel.apply(pipe, method="window", density=1.0, block_q=16, block_k=16)
    pipe.load_ip_adapter(
        state_dict, weight_name="ip.safetensors", image_encoder_pretrained_model_name_or_path=None
    )
    # diffusers rebuilt the single-block processor as type(processor)(): it still serves through dit_accel.
    assert _kinds(pipe.transformer) == {
        "transformer_blocks.0.attn.processor": "FluxIPAdapterAttnProcessor",
        "single_transformer_blocks.0.attn.processor": "FluxSparseAttnProcessor",
    }
    torch.testing.assert_close(_flux_run(pipe, ip=True), ref, atol=1e-5, rtol=1e-5)
    assert [r["layer"] for r in handle.stats().records] == ["transformer.single_transformer_blocks.0.attn"]

    pipe.unload_ip_adapter()
    torch.testing.assert_close(_flux_run(pipe, ip=False), base, atol=1e-5, rtol=1e-5)
    dit_accel.remove(pipe)
    assert _kinds(pipe.transformer) == {
        "transformer_blocks.0.attn.processor": "FluxAttnProcessor",
        "single_transformer_blocks.0.attn.processor": "FluxAttnProcessor",
    }
    assert torch.equal(_flux_run(pipe, ip=False), base)


def _sd3_ip_state_dict(transformer, embed_dim=16, hidden=32):
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    torch.manual_seed(3)
    dim = transformer.config.attention_head_dim * transformer.config.num_attention_heads
    proj = IPAdapterTimeImageProjection(
        embed_dim=embed_dim, output_dim=dim, hidden_dim=hidden, heads=1, num_queries=4, timestep_in_dim=hidden
    )
    ip = {}
    for i in range(len(transformer.attn_processors)):
        layer = SD3IPAdapterJointAttnProcessor2_0(
            hidden_size=dim,
            ip_hidden_states_dim=dim,
            head_dim=transformer.config.attention_head_dim,
            timesteps_emb_dim=hidden,
        )
        ip.update({f"{i}.{k}": t for k, t in layer.state_dict().items()})
    return {"image_proj": proj.state_dict(), "ip_adapter": ip}


def _sd3_run(pipe, ip: bool):
    _, inputs = TRANSFORMERS["sd3"]()
    x = inputs(1)
    if ip:
        embeds = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(6))
        x["joint_attention_kwargs"] = {"ip_adapter_image_embeds": embeds}
    return _forward(pipe.transformer, x)


def test_sd3_ip_adapter_unload_rebuild_then_load_and_unload_after_apply():
    load = {"image_encoder_folder": None, "low_cpu_mem_usage": False}
    state_dict = _sd3_ip_state_dict(sd3_pipeline().transformer)
    stock = sd3_pipeline()
    base = _sd3_run(stock, ip=False)
    stock.load_ip_adapter(state_dict, **load)
    ref = _sd3_run(stock, ip=True)

    pipe = sd3_pipeline()
    handle = dit_accel.apply(pipe, method="window", density=1.0, block_q=16, block_k=16)
    pipe.unload_ip_adapter()  # rebuilds every processor as type(processor)()
    assert set(_kinds(pipe.transformer).values()) == {"SD3SparseAttnProcessor"}
    torch.testing.assert_close(_sd3_run(pipe, ip=False), base, atol=1e-5, rtol=1e-5)
    assert len(handle.stats().records) == 3
    pipe.load_ip_adapter(state_dict, **load)
    torch.testing.assert_close(_sd3_run(pipe, ip=True), ref, atol=0, rtol=0)
    pipe.unload_ip_adapter()
    dit_accel.remove(pipe)
    assert set(_kinds(pipe.transformer).values()) == {"JointAttnProcessor2_0"}
    assert torch.equal(_sd3_run(pipe, ip=False), base)


def test_processor_built_without_arguments():
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    ref = _forward(model, x)
    detached = type(
        dit_accel.attn_processors(wan_transformer(), method="dense")["blocks.0.attn1.processor"]
    )()
    assert detached.runtime is None and type(detached.stock).__name__ == "WanAttnProcessor"
    model.set_attn_processor(detached)  # no handle on this model: the stock processor serves
    assert torch.equal(_forward(model, x), ref)
    pickle.dumps(detached)


def test_replaced_layers_are_logged_at_the_next_run(caplog):
    pipe = flux_pipeline()
    dit_accel.apply(pipe, method="dense")
    pipe.load_ip_adapter(
        _flux_ip_state_dict(pipe.transformer),
        weight_name="ip.safetensors",
        image_encoder_pretrained_model_name_or_path=None,
    )
    _log_once.cache_clear()  # the message is logged once per process
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        _flux_run(pipe, ip=True)
    assert "1 of 2 layers dit_accel replaced run other processors now (['FluxIPAdapterAttnProcessor']" in (
        caplog.text
    )


# --------------------------------------------------------------------------------------------------
# 3. layerwise casting and autocast
# --------------------------------------------------------------------------------------------------
def _cast(x, dtype):
    return {
        k: (t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t)
        for k, t in x.items()
    }


@pytest.mark.parametrize("knobs", [{"method": "dense"}, {**SPARSE, "density": 1.0}], ids=["dense", "window1"])
def test_layerwise_casting_inference_and_training(knobs):
    x = TRANSFORMERS["wan"]()[1](1)
    stock = wan_transformer()
    stock.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    ref = _forward(stock, x)
    model = wan_transformer()
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    dit_accel.apply(model, **knobs)
    torch.testing.assert_close(_forward(model, x), ref, atol=1e-5, rtol=1e-5)
    # diffusers' test_layerwise_casting_training, on CPU: fp16 and fp8 storage, fp32 compute, autocast.
    for storage in (torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
        model = wan_transformer().train()
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
        dit_accel.apply(model, **knobs)
        with torch.amp.autocast(device_type="cpu"):
            out = model(**x, return_dict=False)[0]
            loss = F.mse_loss(out, torch.zeros_like(out))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", ["sd3", "qwenimage", "hunyuan_video"])
def test_sparse_path_under_autocast_matches_stock(family):
    """Under CPU autocast these families reach attention with fp32 q/k and bf16 v; SDPA casts them to the
    autocast dtype and so must the sparse path."""
    model, inputs = TRANSFORMERS[family]()
    x = inputs(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _forward(model, x)
        dit_accel.apply(model, method="window", density=1.0, block_q=16, block_k=16, backend="torch")
        out = _forward(model, x)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize(
    "knobs", [{"method": "dense"}, {"method": "window", "density": 1.0}], ids=["dense", "window1"]
)
def test_gpu_layerwise_casting_bf16(knobs, warm):
    """diffusers' test_layerwise_casting_memory and _training on Wan, with dit_accel applied (Triton on the
    GPU for inference, the reference under grad). ``cold`` measures the first forward, as diffusers' test
    does (it includes Triton's first-call autotuning, whose benchmark allocates a scratch buffer); ``warm``
    measures a second forward. Peaks are counted above what was allocated before the forward: the model's
    weights are a few kB, and what other tests in the process hold would swamp the difference."""
    device = "cuda"

    def peak(storage, compute):
        torch.manual_seed(0)
        model = wan_transformer().to(device, dtype=compute)
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
        dit_accel.apply(model, **knobs)
        x = {k: t.to(device) for k, t in _cast(TRANSFORMERS["wan"]()[1](1), compute).items()}
        if warm:
            _forward(model, x)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()  # the model, and whatever earlier tests left allocated
        out = _forward(model, x)
        assert torch.isfinite(out).all()
        return model.get_memory_footprint(), torch.cuda.max_memory_allocated() - before

    fp32 = peak(torch.float32, torch.float32)
    fp8_fp32 = peak(torch.float8_e4m3fn, torch.float32)
    fp8_bf16 = peak(torch.float8_e4m3fn, torch.bfloat16)
    assert fp8_bf16[0] < fp8_fp32[0] < fp32[0]
    if torch.cuda.get_device_capability()[0] >= 8:
        assert fp8_bf16[1] < fp8_fp32[1], (fp8_bf16, fp8_fp32)
    assert fp8_fp32[1] < fp32[1] or abs(fp8_fp32[1] - fp32[1]) < 0.2 * 1024**2, (fp8_fp32, fp32)
    for storage, compute in [
        (torch.float16, torch.float32),
        (torch.float8_e4m3fn, torch.float32),
        (torch.float8_e4m3fn, torch.bfloat16),
    ]:
        model = wan_transformer().to(device, dtype=compute).train()
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
        dit_accel.apply(model, **knobs)
        x = {k: t.to(device) for k, t in _cast(TRANSFORMERS["wan"]()[1](1), compute).items()}
        with torch.amp.autocast(device_type=device):
            out = model(**x, return_dict=False)[0]
            loss = F.mse_loss(out, torch.zeros_like(out))
        loss.backward()


# --------------------------------------------------------------------------------------------------
# 4. CPU offload and hooks added after apply
# --------------------------------------------------------------------------------------------------
def _count_calls(hook, name):
    calls = []
    original = getattr(hook, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(hook, name, counted)
    return calls


def test_remove_keeps_accelerates_offload_hook():
    from accelerate.hooks import remove_hook_from_module

    pipe = wan_pipeline()
    ref = run_wan(pipe, steps=2)
    handle = dit_accel.apply(pipe, method="window", density=0.5, block_q=16, block_k=16)
    pipe.enable_model_cpu_offload(device="cpu")
    sparse = run_wan(pipe, steps=2)
    assert not torch.equal(sparse, ref) and handle.stats().records
    dit_accel.remove(pipe)
    transformer = pipe.transformer
    assert hasattr(transformer, "_hf_hook")
    calls = _count_calls(transformer._hf_hook, "pre_forward")
    assert torch.equal(run_wan(pipe, steps=2), ref)
    assert calls, "accelerate's offload hook no longer runs"
    assert TRACKER_HOOK_NAME not in getattr(_diffusers.hook_registry(transformer), "hooks", {})
    remove_hook_from_module(transformer)
    assert torch.equal(run_wan(pipe, steps=2), ref)


def test_remove_with_offload_installed_first():
    from accelerate import cpu_offload_with_hook

    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    ref = _forward(model, x)
    model, hook = cpu_offload_with_hook(model, execution_device="cpu")
    dit_accel.apply(model, **SPARSE)
    assert not torch.equal(_forward(model, x), ref)
    dit_accel.remove(model)
    calls = _count_calls(model._hf_hook, "pre_forward")
    assert torch.equal(_forward(model, x), ref) and calls


class _Counting(_diffusers.ModelHook):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def test_remove_keeps_a_diffusers_hook_registered_after_apply():
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    ref = _forward(model, x)
    dit_accel.apply(model, **SPARSE)
    counting = _Counting()
    _diffusers.HookRegistry.check_if_exists_or_initialize(model).register_hook(counting, "counting")
    dit_accel.remove(model)
    assert torch.equal(_forward(model, x), ref) and counting.calls == 1
    registry = _diffusers.hook_registry(model)
    assert list(registry.hooks) == ["counting"]
    registry.remove_hook("counting", recurse=False)
    assert torch.equal(_forward(model, x), ref)


def test_remove_keeps_a_plain_forward_wrapper():
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    ref = _forward(model, x)
    dit_accel.apply(model, **SPARSE)
    inner, calls = model.forward, []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    model.forward = wrapper
    dit_accel.remove(model)
    assert model.forward is wrapper
    assert torch.equal(_forward(model, x), ref) and calls


def test_remove_after_the_tracker_hook_was_taken_out_by_hand():
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    ref = _forward(model, x)
    dit_accel.apply(model, **SPARSE)
    _diffusers.hook_registry(model).remove_hook(TRACKER_HOOK_NAME, recurse=False)
    dit_accel.remove(model)
    assert "_diffusers_hook" not in model.__dict__ and "forward" not in model.__dict__
    assert torch.equal(_forward(model, x), ref)


@pytest.mark.parametrize("cache_first", [True, False], ids=["cache-first", "apply-first"])
def test_first_block_cache_either_order(cache_first):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    config = FirstBlockCacheConfig(threshold=0.5)
    stock = wan_pipeline()
    apply_first_block_cache(stock.transformer, config)
    ref = run_wan(stock, steps=4)
    pipe = wan_pipeline()
    if cache_first:
        apply_first_block_cache(pipe.transformer, config)
    handle = dit_accel.apply(pipe, method="dense")
    if not cache_first:
        apply_first_block_cache(pipe.transformer, config)
    assert torch.equal(run_wan(pipe, steps=4), ref)
    steps = sorted({r["step"] for r in handle.stats().records if r["layer"].endswith("blocks.1.attn1")})
    assert steps == [0], "the cache should skip block 1 after the first step"
    dit_accel.remove(pipe)
    assert torch.equal(run_wan(pipe, steps=4), ref)
    assert pipe.transformer.blocks[1]._diffusers_hook.get_hook("fbc_block_hook") is not None


# --------------------------------------------------------------------------------------------------
# 5. BlockPlan and kv_len
# --------------------------------------------------------------------------------------------------
def _plan(indices, counts, n=4, block_q=16, block_k=16):
    idx = torch.tensor(indices, dtype=torch.int32).reshape(1, 1, len(counts), -1)
    return BlockPlan(block_q, block_k, idx, torch.tensor(counts, dtype=torch.int32).reshape(1, 1, -1), n)


@pytest.mark.parametrize(
    "indices, counts, n, match",
    [
        pytest.param(
            [[2, 1]], [2], 4, r"kv_indices\[0, 0, 0\] is not strictly ascending.*entry 0 is 2", id="unsorted"
        ),
        pytest.param([[1, 1]], [2], 4, "not strictly ascending.*entry 1 is 1", id="duplicate"),
        pytest.param(
            [[0, 4]], [2], 4, r"kv_indices\[0, 0, 0, 1\] = 4 is outside \[0, num_kv_blocks=4\)", id="range"
        ),
        pytest.param([[-1, 2]], [2], 4, r"= -1 is outside \[0, num_kv_blocks=4\)", id="negative"),
        pytest.param(
            [[0, 1]], [3], 4, r"kv_counts\[0, 0, 0\] = 3: counts must lie in \[0, max_k=2\]", id="count-high"
        ),
        pytest.param([[0, 1]], [-1], 4, r"kv_counts\[0, 0, 0\] = -1", id="count-negative"),
        pytest.param([[0]], [1], -2, "num_kv_blocks must be an int >= 0, got -2", id="num-kv-negative"),
        pytest.param([[0]], [1], 2.0, "num_kv_blocks must be an int", id="num-kv-float"),
    ],
)
def test_invalid_plans_raise(indices, counts, n, match):
    with pytest.raises(ValueError, match=match):
        _plan(indices, counts, n)


@pytest.mark.parametrize(
    "block_q, block_k, match",
    [
        pytest.param(16.0, 16, "block_q must be a positive int.*16.0", id="float"),
        pytest.param(16, True, "block_k must be a positive int.*True", id="bool"),
        pytest.param(0, 16, "block_q must be a positive int.*0", id="zero"),
    ],
)
def test_invalid_block_sizes_raise(block_q, block_k, match):
    with pytest.raises(ValueError, match=match):
        _plan([[0]], [1], 1, block_q, block_k)
    with pytest.raises(ValueError, match=match):
        BlockPlan.from_block_mask(torch.ones(1, 1, 1, 1, dtype=torch.bool), block_q, block_k)


def test_valid_plan_density_and_padding():
    plan = _plan([[0, 2, 7], [1, -5, 99]], [2, 1], n=3)  # entries past the count are ignored
    assert plan.density() == pytest.approx(3 / 6)
    assert plan.to_block_mask().tolist() == [[[[True, False, True], [False, True, False]]]]


def test_kv_len_validation():
    q, k, v = (torch.randn(2, 40, 2, 16) for _ in range(3))
    plan = BlockPlan.dense(40, 40, 16, 16)
    bad = [
        (torch.tensor([True, False]), "a bool"),
        (True, "a bool"),
        (torch.tensor([3, -1]), r"kv_len must be >= 0.*kv_len\[1\] = -1"),
        (-2, "kv_len must be >= 0"),
        ([4, -4], "kv_len must be >= 0"),
        ([4, 2.5], "kv_len must be"),
        (torch.tensor([1.0, 2.0]), "integer tensor"),
        (torch.tensor([1, 2, 3]), r"shape \(3,\)"),
    ]
    for kv_len, match in bad:
        with pytest.raises(ValueError, match=match):
            block_sparse_attention(q, k, v, plan, kv_len=kv_len, backend="torch")
    full, _ = block_sparse_attention(q, k, v, plan, backend="torch")
    for past in (40, 1000, torch.tensor([2**40, 41]), [50, 40]):
        out, _ = block_sparse_attention(q, k, v, plan, kv_len=past, backend="torch")
        assert torch.equal(out, full)


# --------------------------------------------------------------------------------------------------
# 7. backend, options, pickling
# --------------------------------------------------------------------------------------------------
def test_triton_backend_refused_in_apply_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = wan_transformer()
    match = r"backend='triton' cannot run here: no CUDA device.*Allowed here: \['auto', 'torch'\]"
    with pytest.raises(ValueError, match=match):
        dit_accel.apply(model, method="window", backend="triton")
    assert _diffusers.hook_registry(model) is None
    assert not _processors(model)


@pytest.mark.parametrize("options", [[("density", 0.1)], "density=0.1", 0.1])
def test_options_must_be_a_mapping(options):
    with pytest.raises(ValueError, match=f"options must be a mapping.*got {type(options).__name__}"):
        dit_accel.apply(wan_transformer(), method="window", options=options)
    with pytest.raises(ValueError, match="options must be a mapping"):
        dit_accel.SparseAttentionConfig(method="window", options=options)


def test_pickling_an_applied_model_says_to_remove_first():
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    ref = _forward(model, x)
    handle = dit_accel.apply(model, **SPARSE)
    for copier in (pickle.dumps, copy.deepcopy, lambda m: torch.save(m, io.BytesIO())):
        with pytest.raises(TypeError, match=r"call dit_accel.remove\(...\)"):
            copier(model)
    with pytest.raises(TypeError, match=r"dit_accel.remove"):
        pickle.dumps(handle)
    dit_accel.remove(model)
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(_forward(clone, x), ref)
    assert torch.equal(_forward(copy.deepcopy(model), x), ref)


# --------------------------------------------------------------------------------------------------
# the diffusers names dit_accel mirrors (dit_accel/_diffusers.py)
# --------------------------------------------------------------------------------------------------
def _seam(condition: bool, what: str) -> None:
    assert condition, (
        f"diffusers {diffusers.__version__}: {what}. dit_accel/_diffusers.py mirrors diffusers "
        f"{_diffusers.DIFFUSERS_SERIES}; update it and the code that uses the name."
    )


def test_diffusers_version_is_the_mirrored_series():
    _seam(diffusers.__version__.startswith(_diffusers.DIFFUSERS_SERIES + "."), "another release series")


def test_diffusers_hook_state_seam():
    model = wan_transformer()
    registry = _diffusers.HookRegistry.check_if_exists_or_initialize(model)
    _seam(
        _diffusers.hook_registry(model) is registry,
        f"the hook registry is no longer `{_diffusers.REGISTRY_ATTR}`",
    )
    _seam(_diffusers.ModelHook._is_stateful is False, "ModelHook._is_stateful is gone")
    manager = _diffusers.StateManager(_diffusers.BaseState)
    _seam(_diffusers.state_context(manager) is None, "StateManager._context is not None before cache_context")
    handle = dit_accel.apply(model, method="dense")
    hook = registry.get_hook(TRACKER_HOOK_NAME)
    _seam(hook._is_stateful, "the step tracker is not a stateful hook")
    seen = []
    original = handle.tracker.begin

    def begin(component, context, *args, **kwargs):
        seen.append(getattr(context, "name", context))
        return original(component, context, *args, **kwargs)

    handle.tracker.begin = begin
    x = TRANSFORMERS["wan"]()[1](1)
    with model.cache_context("uncond"):
        _forward(model, x)
    _forward(model, x)
    _seam(seen == ["uncond", None], f"cache_context no longer reaches StateManager.set_context (saw {seen})")
    dit_accel.remove(model)
    _diffusers.drop_registry(model)
    _seam(_diffusers.hook_registry(model) is None, "drop_registry left the registry")


def test_diffusers_projection_and_rope_helpers_seam():
    torch.manual_seed(0)
    wan = wan_transformer().blocks[0].attn1
    hs = torch.randn(1, 5, wan.to_q.in_features)
    q, k, v = _diffusers.wan_qkv_projections(wan, hs, None)
    _seam(
        all(torch.equal(a, b) for a, b in zip((q, k, v), (wan.to_q(hs), wan.to_k(hs), wan.to_v(hs)))),
        "transformer_wan._get_qkv_projections(attn, hidden_states, None) is not (to_q, to_k, to_v)",
    )
    flux = TRANSFORMERS["flux"]()[0]
    attn = flux.transformer_blocks[0].attn
    hs, ehs = torch.randn(1, 6, attn.query_dim), torch.randn(1, 3, attn.query_dim)
    out = _diffusers.flux_qkv_projections(attn, hs, ehs)
    _seam(
        len(out) == 6 and torch.equal(out[0], attn.to_q(hs)) and torch.equal(out[3], attn.add_q_proj(ehs)),
        "transformer_flux._get_qkv_projections no longer returns (q, k, v, encoder q, k, v)",
    )
    x = torch.randn(1, 6, 2, 8)
    cos, sin = torch.randn(6, 8), torch.randn(6, 8)
    _seam(
        _diffusers.apply_rotary_emb(x, (cos, sin), sequence_dim=1).shape == x.shape,
        "apply_rotary_emb changed",
    )
    _seam(
        _diffusers.ltx_apply_rotary_emb(
            torch.randn(1, 6, 16), (torch.randn(1, 6, 16), torch.randn(1, 6, 16))
        ).shape
        == (1, 6, 16),
        "transformer_ltx.apply_rotary_emb changed",
    )
    freqs = torch.polar(torch.ones(6, 4), torch.randn(6, 4))
    _seam(
        _diffusers.apply_rotary_emb_qwen(x, freqs, use_real=False).shape == x.shape,
        "apply_rotary_emb_qwen(use_real=False) changed",
    )
    q = torch.randn(1, 6, 2, 8)
    dense = _diffusers.dispatch_attention_fn(q, q, q, backend=None, parallel_config=None)
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q))).transpose(1, 2)
    _seam(torch.allclose(dense, ref, atol=1e-6), "dispatch_attention_fn is not SDPA in (B, S, H, D)")


def test_diffusers_processor_classes_seam():
    """The stock processors dit_accel replaces, and the attributes diffusers sets on the dispatch-based ones
    (``set_attention_backend``, context parallelism)."""
    for family in FAMILIES:
        model, _ = TRANSFORMERS[family]()
        spec = family_for(model)
        present = {type(m.processor).__name__ for m in model.modules() if hasattr(m, "processor")}
        _seam(bool(present & set(spec.processors)), f"{family}: none of {sorted(spec.processors)} is in use")
        for ours in set(spec.processors.values()):
            stock = ours.stock_class
            _seam(stock.__name__ in spec.processors, f"{ours.__name__}.stock_class is {stock.__name__}")
            if "dispatch_attention_fn" in inspect.getsource(stock.__call__):
                for name in _diffusers.PROCESSOR_ATTRS:
                    _seam(hasattr(stock, name), f"{stock.__name__} has no class attribute {name}")


def test_diffusers_context_parallel_seam():
    """The context-parallel names of dit_accel/_diffusers.py: the Ulysses exchange, the config's process
    groups, the split hooks and their gather-back, the hook order (tests/test_context_parallel.py runs them
    over two processes)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from diffusers.hooks.context_parallel import ContextParallelSplitHook
    from diffusers.models._modeling_parallel import ContextParallelInput

    fields = {"ring_degree", "ulysses_degree", "ulysses_anything", "ring_anything", "_ulysses_mesh"}
    fields |= {"_flattened_mesh"}
    _seam(fields <= set(ContextParallelConfig.__dataclass_fields__), f"ContextParallelConfig lacks {fields}")
    _seam(
        "processor._parallel_config = config" in inspect.getsource(diffusers.ModelMixin.enable_parallelism),
        "enable_parallelism no longer sets the processors' _parallel_config",
    )
    cp = ContextParallelConfig(ulysses_degree=2)
    hook = ContextParallelSplitHook({"x": ContextParallelInput(split_dim=1, expected_dims=3)}, cp)
    _seam(hook.metadata["x"].split_dim == 1 and hook.parallel_config is cp, "ContextParallelSplitHook")

    model = wan_transformer()
    order = []

    class _Named(_diffusers.ModelHook):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def pre_forward(self, module, *args, **kwargs):
            order.append(self.name)
            return args, kwargs

    registry = _diffusers.HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(_Named("first"), "first")
    registry.register_hook(hook, "cp_input---")
    registry.register_hook(_Named("last"), "last")
    _seam(_diffusers.outer_split_hooks(model, "first") == [hook], "HookRegistry._hook_order changed")
    _seam(_diffusers.outer_split_hooks(model, "last") == [], "HookRegistry._hook_order changed")
    registry.remove_hook("cp_input---", recurse=False)
    _forward(model, TRANSFORMERS["wan"]()[1](1))
    _seam(order == ["last", "first"], f"the hook registered last no longer runs first ({order})")

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x = torch.randn(2, 6, 4, 8)
        y = _diffusers.seq_all_to_all(x, dist.group.WORLD, gather_sequence=True)
        _seam(torch.equal(y, x), "SeqAllToAllDim over one rank is not the identity")
        _seam(torch.equal(_diffusers.seq_all_to_all(y, dist.group.WORLD, False), x), "SeqAllToAllDim inverse")
        mesh = dist.device_mesh.init_device_mesh("cpu", (1, 1), mesh_dim_names=("ring", "ulysses"))
        # a degree of 1 is refused; setup checks only that the degrees fit the world size it is given
        config = ContextParallelConfig(ulysses_degree=2)
        config.setup(0, 2, torch.device("cpu"), mesh)
        _seam(_diffusers.ulysses_group(config) is not None, "ContextParallelConfig._ulysses_mesh")
        _seam(_diffusers.context_parallel_group(config) is not None, "ContextParallelConfig._flattened_mesh")
        split = ContextParallelSplitHook({"x": ContextParallelInput(split_dim=1, expected_dims=3)}, config)
        t = torch.randn(1, 4, 3)
        _seam(torch.equal(_diffusers.unshard_input(split, "x", t), t), "EquipartitionSharder.unshard")
        flat = t[0]
        _seam(_diffusers.unshard_input(split, "x", flat) is flat, "ContextParallelInput.expected_dims")
    finally:
        dist.destroy_process_group()
