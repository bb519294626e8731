"""Public API: config and knobs, apply/remove/attn_processors, stats, errors, the method interface and the
window pattern."""

import logging

import pytest
import torch
from _tiny import (
    TRANSFORMERS,
    Recorder,
    cogvideox_pipeline,
    run_cogvideox,
    run_sd3,
    run_wan,
    sd3_pipeline,
    wan_pipeline,
    wan_transformer,
)
from diffusers.hooks import HookRegistry

import dit_accel
from dit_accel.kernels import BlockPlan
from dit_accel.methods import SparseMethod, WindowMethod, create_method
from dit_accel.methods.window import window_block_mask
from dit_accel.tracking import TRACKER_HOOK_NAME


def test_public_api_is_pinned():
    assert dit_accel.__all__ == [
        "AttentionStats",
        "SparseAttentionConfig",
        "SparseAttentionHandle",
        "SparseMethod",
        "__version__",
        "apply",
        "attn_processors",
        "remove",
    ]
    assert dit_accel.__version__ == "0.1.0"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        pytest.param({"block_q": 0}, ValueError, id="block-zero"),
        pytest.param({"block_k": 16.0}, ValueError, id="block-float"),
        pytest.param({"dense_steps": 1.5}, ValueError, id="fraction-above-one"),
        pytest.param({"dense_steps": -1}, ValueError, id="negative-steps"),
        pytest.param({"dense_layers": ("a",)}, ValueError, id="layer-not-int"),
        pytest.param({"backend": "cuda"}, ValueError, id="backend"),
    ],
)
def test_config_validation(kwargs, error):
    with pytest.raises(error):
        dit_accel.SparseAttentionConfig(**kwargs)


def test_knobs_build_the_config():
    base = dit_accel.SparseAttentionConfig(method="window", block_q=64)
    cfg = dit_accel.SparseAttentionConfig.from_knobs(base, dense_steps=0.25, density=0.2, dense_layers=3)
    assert (cfg.method, cfg.block_q, cfg.dense_steps, cfg.dense_layers) == ("window", 64, 0.25, (3,))
    assert cfg.options == {"density": 0.2}
    assert cfg.num_dense_steps(50) == 12 and cfg.num_dense_steps(None) is None
    assert cfg.is_dense_layer(3, 10) and not cfg.is_dense_layer(2, 10)
    assert dit_accel.SparseAttentionConfig(dense_layers=(-1,)).is_dense_layer(9, 10)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param(
            {"method": "rettention", "options": {"base": "radial", "density": 0.1}},
            ValueError,
            "takes",
            id="foreign-base-knob",
        ),
        pytest.param({"method": "nope"}, ValueError, "unknown method", id="unknown"),
        pytest.param(
            {"method": "window", "options": {"width": 3}}, ValueError, "bad options", id="bad-option"
        ),
        pytest.param(
            {"method": "window", "options": {"density": 0.0}}, ValueError, "density", id="bad-density"
        ),
        pytest.param(
            {"method": WindowMethod(), "options": {"density": 0.5}}, ValueError, "instance", id="instance"
        ),
    ],
)
def test_method_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        create_method(dit_accel.SparseAttentionConfig(**kwargs))


def test_unsupported_transformers_get_a_clear_error():
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        dit_accel.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        dit_accel.apply(object())
    from diffusers import SanaTransformer2DModel

    sana = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=8,
        patch_size=1,
    )
    with pytest.raises(
        ValueError, match="linear attention.*Supported transformers: .*FluxTransformer2DModel"
    ):
        dit_accel.apply(sana)
    assert not hasattr(sana, "_diffusers_hook")


def _x(batch=1):
    return TRANSFORMERS["wan"]()[1](batch)


def _forward(model, x):
    with torch.no_grad():
        return model(**x, return_dict=False)[0]


def test_remove_restores_processors_and_hooks_exactly():
    model = wan_transformer()
    x = _x()
    ref = _forward(model, x)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert "_diffusers_hook" not in model.__dict__ and "forward" not in model.__dict__
    dit_accel.apply(model, method="window", density=0.3, block_q=16, block_k=16)
    assert HookRegistry.check_if_exists_or_initialize(model).get_hook(TRACKER_HOOK_NAME) is not None
    assert not torch.equal(_forward(model, x), ref)
    assert dit_accel.remove(model) is True
    assert dit_accel.remove(model) is False
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert all(after[n] is p for n, p in before.items()) and after.keys() == before.keys()
    assert "_diffusers_hook" not in model.__dict__ and "forward" not in model.__dict__
    assert not hasattr(model, "_dit_accel_handle")
    assert torch.equal(_forward(model, x), ref)


def test_apply_twice_replaces_and_keeps_other_hooks():
    pipe = wan_pipeline()
    ref = run_wan(pipe, steps=2)
    first = dit_accel.apply(pipe, method="window", density=0.3, block_q=16, block_k=16)
    second = dit_accel.apply(pipe, method="dense")
    registry = pipe.transformer._diffusers_hook
    assert registry._hook_order.count(TRACKER_HOOK_NAME) == 1
    proc = pipe.transformer.blocks[0].attn1.processor
    assert proc.runtime.method is second.method and type(proc.stock).__name__ == "WanAttnProcessor"
    assert first.method is not second.method and pipe._dit_accel_handle is second
    assert torch.equal(run_wan(pipe, steps=2), ref)
    dit_accel.remove(pipe)
    assert not hasattr(pipe, "_dit_accel_handle") and TRACKER_HOOK_NAME not in registry.hooks
    assert torch.equal(run_wan(pipe, steps=2), ref)


def test_attn_processors_for_set_attn_processor():
    pipe = wan_pipeline()
    ref = run_wan(pipe, steps=2)
    rec = Recorder()
    procs = dit_accel.attn_processors(pipe.transformer, method=rec)
    assert procs.keys() == pipe.transformer.attn_processors.keys()
    replaced = [k for k, p in procs.items() if type(p).__name__ == "WanSparseAttnProcessor"]
    assert replaced == ["blocks.0.attn1.processor", "blocks.1.attn1.processor"]
    pipe.transformer.set_attn_processor(procs)
    assert torch.equal(run_wan(pipe, steps=2), ref)
    steps = [(c["context"], c["step"], c["num_steps"]) for c in rec.calls if c["layer_index"] == 0]
    assert steps == [("cond", 0, 2), ("uncond", 0, 2), ("cond", 1, 2), ("uncond", 1, 2)]
    dit_accel.remove(pipe.transformer)
    assert type(pipe.transformer.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"


def test_attn_processors_by_assignment_for_mochi():
    model, inputs = TRANSFORMERS["mochi"]()
    x = inputs(2)
    ref = _forward(model, x)
    procs = dit_accel.attn_processors(model, method="window", density=1.0, block_q=16, block_k=16)
    for path, module in model.named_modules():
        if hasattr(module, "processor"):
            module.processor = procs[f"{path}.processor"]
    assert torch.allclose(_forward(model, x), ref, atol=1e-5, rtol=0)
    dit_accel.remove(model)
    assert torch.equal(_forward(model, x), ref)


def test_processor_without_tracker_raises():
    model = wan_transformer()
    dit_accel.apply(model, method="dense")
    model._diffusers_hook.remove_hook(TRACKER_HOOK_NAME, recurse=False)
    with pytest.raises(RuntimeError, match="step tracker hook is missing"):
        _forward(model, _x())


def test_stats_per_step_and_layer_with_timing():
    pipe = wan_pipeline()
    handle = dit_accel.apply(
        pipe,
        method="window",
        density=0.5,
        block_q=16,
        block_k=16,
        dense_steps=1,
        dense_layers=(0,),
        timing=True,
    )
    run_wan(pipe, steps=3)
    stats = handle.stats()
    assert len(stats.records) == 3 * 2 * 2
    kinds = {(r["context"], r["step"], r["layer"]): r["kind"] for r in stats.records}
    for ctx in ("cond", "uncond"):
        assert kinds[(ctx, 0, "transformer.blocks.1.attn1")] == "dense"
        assert kinds[(ctx, 2, "transformer.blocks.0.attn1")] == "dense"
        assert kinds[(ctx, 2, "transformer.blocks.1.attn1")] == "sparse"
    sparse = [r for r in stats.records if r["kind"] == "sparse"]
    assert len(sparse) == 4 and all(0.0 < r["density"] < 1.0 for r in sparse)
    assert all(isinstance(r["time_ms"], float) and r["time_ms"] >= 0 for r in stats.records)
    rows = stats.per_step()
    assert [(r["context"], r["step"], r["dense"], r["sparse"]) for r in rows][:3] == [
        ("cond", 0, 2, 0),
        ("uncond", 0, 2, 0),
        ("cond", 1, 1, 1),
    ]
    text = stats.summary()
    assert text.startswith("dit_accel[window]: 12 attention calls") and "8 dense, 4 sparse" in text
    assert len(text.splitlines()) == 2 + len(rows)


def test_fractional_warmup_with_unknown_step_count_runs_dense(caplog):
    model = wan_transformer()
    handle = dit_accel.apply(model, method="window", density=0.3, block_q=16, block_k=16, dense_steps=0.5)
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        _forward(model, _x())
    assert {r["kind"] for r in handle.stats().records} == {"dense"}


class _CountingWindow(WindowMethod):
    def __init__(self, adaptive=False):
        super().__init__(density=0.5)
        self.adaptive = adaptive
        self.built = []

    def reuse_plan(self, entry, call):
        return not self.adaptive

    def plan_for(self, q, k, call):
        self.built.append((call.info.run, call.context, call.layer, call.step))
        return super().plan_for(q, k, call)


@pytest.mark.parametrize("adaptive", [pytest.param(False, id="static"), pytest.param(True, id="adaptive")])
def test_plans_are_cached_per_context_and_layer(adaptive):
    pipe = wan_pipeline()
    method = _CountingWindow(adaptive)
    dit_accel.apply(pipe, method=method, block_q=16, block_k=16)
    run_wan(pipe, steps=3)
    assert len(method.built) == (12 if adaptive else 4)
    assert len(method.cache) == 0, "the pipeline's end-of-call reset drops cached plans"
    run_wan(pipe, steps=2, height=64, width=48, frames=5)
    assert len(method.built) == (12 + 8 if adaptive else 8)
    assert len({b[0] for b in method.built}) == 2


class _Corrected(SparseMethod):
    """A rettention-shaped method: full + sparse at refresh steps, rho * sparse + R in between."""

    name = "corrected"

    def __init__(self, refresh=2):
        super().__init__()
        self.refresh = refresh
        self.seen = []

    def attention(self, q, k, v, call):
        state = call.entry.state
        plan = WindowMethod(0.3).plan_for(q, k, call)
        self.seen.append((call.context, call.step, sorted(state)))
        if call.step % self.refresh == 0:
            full, lse_full = call.run_dense(return_lse=True)
            sparse, lse_sparse = call.run_sparse(plan, return_lse=True)
            rho = torch.exp(lse_sparse - lse_full).transpose(1, 2).unsqueeze(-1)
            state["rho"], state["residual"] = rho, full - rho * sparse
            return full
        call.label = "corrected"
        return state["rho"] * call.run_sparse(plan) + state["residual"]


def test_a_corrected_method_fits_the_interface():
    pipe = wan_pipeline()
    ref = run_wan(pipe, steps=3)
    method = _Corrected(refresh=3)
    handle = dit_accel.apply(pipe, method=method, block_q=16, block_k=16)
    out = run_wan(pipe, steps=3)
    assert [s for c, s, st in method.seen if c == "cond"][::2] == [0, 1, 2]
    assert [st for c, s, st in method.seen if c == "cond" and s > 0] == [["residual", "rho"]] * 4
    kinds = {(r["step"], r["kind"]) for r in handle.stats().records}
    assert kinds == {(0, "dense+sparse"), (1, "corrected"), (2, "corrected")}
    assert all(1.0 < r["density"] < 2.0 for r in handle.stats().records if r["kind"] == "dense+sparse")
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    method.seen.clear()
    run_wan(pipe, steps=1)
    assert method.seen[0] == ("cond", 0, []), "state is dropped at a new run"


def test_corrected_refresh_step_reconstructs_dense_exactly():
    model = wan_transformer()
    x = _x(2)
    ref = _forward(model, x)
    dit_accel.apply(model, method=_Corrected(), block_q=16, block_k=16)
    out = _forward(model, x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "text, position, rows, cols",
    [
        pytest.param(0, None, [], [], id="no-text"),
        pytest.param(20, "first", [0, 1], [0, 1], id="text-first"),
        pytest.param(20, "last", [3, 4], [3, 4], id="text-last"),
    ],
)
def test_window_block_mask(text, position, rows, cols):
    mask = window_block_mask(80, 80, 16, 16, 0.6, text, position)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    for i in range(5):
        expected[i, max(0, i - 1) : i + 2] = True
    expected[rows] = True
    expected[:, cols] = True
    assert torch.equal(mask, expected)
    assert window_block_mask(77, 77, 16, 32, 1.0).all()
    tiny = window_block_mask(77, 77, 16, 16, 0.01)
    assert torch.equal(tiny, torch.eye(5, dtype=torch.bool))


@pytest.mark.parametrize(
    "build, run, kwargs",
    [
        pytest.param(sd3_pipeline, run_sd3, {"prompts": 2}, id="sd3"),
        pytest.param(cogvideox_pipeline, run_cogvideox, {"prompts": 2}, id="cogvideox"),
    ],
)
def test_batch2_with_batched_cfg(build, run, kwargs):
    class FullPlan(SparseMethod):
        """The sparse kernel path with every block (window at density 1 runs the stock op instead)."""

        def plan_for(self, q, k, call):
            return BlockPlan.dense(call.q_len, call.k_len, call.block_q, call.block_k, device=q.device)

    pipe = build()
    ref = run(pipe, steps=2, **kwargs)
    handle = dit_accel.apply(pipe, method=FullPlan(), block_q=16, block_k=16)
    out = run(pipe, steps=2, **kwargs)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert {r["kind"] for r in handle.stats().records} == {"sparse"}
    handle = dit_accel.apply(pipe, method="window", density=1.0, block_q=16, block_k=16)
    assert torch.equal(run(pipe, steps=2, **kwargs), ref)
    assert {r["kind"] for r in handle.stats().records} == {"full_plan"}
    dit_accel.apply(pipe, method="window", density=0.3, block_q=16, block_k=16)
    sparse = run(pipe, steps=2, **kwargs)
    assert torch.isfinite(sparse).all() and not torch.allclose(sparse, ref)


def test_forward_benchmark_smoke(tmp_path, monkeypatch):
    import json

    from _bench import load_benchmark

    bench = load_benchmark("bench_forward", monkeypatch)
    out = tmp_path / "forward.json"
    result = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["correct"] and result["checks"]["dense_equals_stock"]
    rows = {"stock", "dit_accel_dense", "dit_accel_dense_stock_rope", "window", "no_attention"}
    assert set(result["ms"]) == rows
    assert result["rope_ms"]["equal"] and result["rope_ms"]["stock"] > 0
    assert 0.0 < result["window_density"] < 1.0
    for row in result["cuda_graphs"].values():  # CPU: every forward eager, the same output
        assert row["equal_to_eager"]
        assert row["forwards"]["eager: an input tensor is not on a cuda device"] == 3


def test_window_logs_when_whole_blocks_move_its_density(caplog):
    from dit_accel.methods import window

    window._log_once.cache_clear()
    pipe = wan_pipeline()
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        dit_accel.apply(pipe, method="window", density=0.34, block_q=16, block_k=16)
        run_wan(pipe, steps=1)  # 45 tokens, 3 key blocks: the diagonal block alone is 1/3, close to 0.34
        assert "keeps" not in caplog.text
        dit_accel.apply(pipe, method="window", density=0.1, block_q=16, block_k=16)
        run_wan(pipe, steps=1)  # still the diagonal block: 3.3x the density asked for
    expected = "window: density 0.1 keeps 0.333 of the key blocks at 45 tokens with 16-token blocks"
    assert expected in caplog.text
