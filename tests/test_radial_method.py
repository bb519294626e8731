"""The radial method in the processors: tiny pipelines of every video family, per-family defaults, the
shared per-geometry plan, warm-up / dense layers / last steps, and the refusals (image families, bad knobs,
sequences that are not the grid)."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch
from _tiny import TRANSFORMERS, _gen, _randn, cogvideox_pipeline, run_wan, wan_pipeline
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, LTXPipeline, MochiPipeline

import dit_accel
from dit_accel.methods import AttentionCall, create_method
from dit_accel.methods.radial import RadialMethod, block_mask, build_plan
from dit_accel.processors import SUPPORTED
from dit_accel.tracking import ForwardInfo

BLOCK = 16
STEPS = 4  # dense_steps 0.25 of 4 steps: step 0 is the warm-up


def _family(name):
    return importlib.import_module(f"dit_accel.processors.{name}").FAMILY


def _defaults(name) -> SimpleNamespace:
    """The family's radial defaults (``Family.defaults["radial"]``)."""
    return SimpleNamespace(**_family(name).defaults["radial"])


def _mask(valid: int, length: int = 7, dtype=torch.bool) -> torch.Tensor:
    m = torch.zeros(1, length, dtype=torch.bool)
    m[0, :valid] = True
    return m.to(dtype)


def _wan(frames=33, height=48, width=80):
    pipe = wan_pipeline()
    return pipe, lambda steps=STEPS: run_wan(pipe, steps=steps, frames=frames, height=height, width=width)


def _hunyuan():
    model, _ = TRANSFORMERS["hunyuan_video"]()
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=model,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )

    def run(steps=STEPS):
        g = _gen(0)
        return pipe(
            prompt_embeds=_randn(1, 7, 16, g=g),
            pooled_prompt_embeds=_randn(1, 8, g=g),
            prompt_attention_mask=_mask(5),
            height=32,
            width=48,
            num_frames=33,
            num_inference_steps=steps,
            generator=_gen(0),
            output_type="latent",
        ).frames

    return pipe, run


def _cogvideox():
    pipe = cogvideox_pipeline()

    def run(steps=STEPS):
        g = _gen(0)
        return pipe(
            prompt_embeds=_randn(1, 7, 32, g=g),
            negative_prompt_embeds=_randn(1, 7, 32, g=g),
            height=48,
            width=80,
            num_frames=33,
            num_inference_steps=steps,
            guidance_scale=6.0,
            generator=_gen(0),
            output_type="latent",
        ).frames

    return pipe, run


def _ltx():
    model, _ = TRANSFORMERS["ltx"]()
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=model,
    )

    def run(steps=STEPS):
        g = _gen(0)
        return pipe(
            prompt_embeds=_randn(1, 7, 32, g=g),
            prompt_attention_mask=_mask(5, dtype=torch.long),
            negative_prompt_embeds=_randn(1, 7, 32, g=g),
            negative_prompt_attention_mask=_mask(7, dtype=torch.long),
            height=128,
            width=160,
            num_frames=65,
            num_inference_steps=steps,
            generator=_gen(0),
            output_type="latent",
        ).frames

    return pipe, run


def _mochi():
    model, _ = TRANSFORMERS["mochi"]()
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=model,
    )

    def run(steps=STEPS):
        g = _gen(0)
        return pipe(
            prompt_embeds=_randn(1, 7, 16, g=g),
            prompt_attention_mask=_mask(5),
            negative_prompt_embeds=_randn(1, 7, 16, g=g),
            negative_prompt_attention_mask=_mask(7),
            height=64,
            width=80,
            num_frames=49,
            num_inference_steps=steps,
            generator=_gen(0),
            output_type="latent",
        ).frames

    return pipe, run


# family -> (pipeline builder, latent grid in tokens, text tokens, text first) for the runs above
VIDEO = {
    "wan": (_wan, (9, 3, 5), 0, False),
    "hunyuan_video": (_hunyuan, (9, 4, 6), 7, False),
    "cogvideox": (_cogvideox, (9, 3, 5), 7, True),
    "ltx": (_ltx, (9, 4, 5), 0, False),
    "mochi": (_mochi, (9, 4, 5), 7, False),
}


def _density(mask: torch.Tensor) -> float:
    return mask.sum().item() / mask.numel()


def _expected_mask(family, grid, text, first, **over):
    d = _defaults(family)
    kw = {"decay": d.decay, "sink_frame": d.sink_frame, **over}
    return block_mask(*grid, text_tokens=text, text_first=first, block=BLOCK, **kw)


def _spy_plans(method) -> list:
    """The plan each attention call of ``method`` used (None for dense calls), in call order."""
    used = []
    attention = method.attention

    def spy(q, k, v, call):
        out = attention(q, k, v, call)
        used.append(call.entry.plan if call.events and call.events[-1][0] == "sparse" else None)
        return out

    method.attention = spy
    return used


@pytest.mark.parametrize("family", [pytest.param(f, id=f) for f in VIDEO])
def test_video_family_end_to_end(family):
    build, grid, text, first = VIDEO[family]
    pipe, run = build()
    handle = dit_accel.apply(pipe, method="radial", block_q=BLOCK, block_k=BLOCK)
    defaults = _defaults(family)
    assert handle.config.dense_steps == defaults.dense_steps == 0.25
    assert handle.config.dense_layers == defaults.dense_layers
    assert (handle.method.decay, handle.method.sink_frame) == (defaults.decay, defaults.sink_frame)

    used = _spy_plans(handle.method)
    out = run()
    assert torch.isfinite(out).all()

    expected = _expected_mask(family, grid, text, first)
    density = _density(expected)
    assert 0.3 < density < 0.95, f"{family}: test grid gives a degenerate plan ({density:.3f})"

    records = handle.stats().records
    n_layers = len(handle.layers)
    dense_layers = {i % n_layers for i in defaults.dense_layers}
    steps = sorted({r["step"] for r in records})
    assert steps == list(range(STEPS))
    for r in records:
        index = handle.layers.index(r["layer"])
        if r["step"] == 0 or index in dense_layers:
            assert (r["kind"], r["density"]) == ("dense", 1.0), r
        else:
            assert r["kind"] == "sparse" and r["density"] == pytest.approx(density, abs=1e-12), r

    # One plan for the geometry, built once and shared by every (context, layer), equal to build_plan's.
    assert handle.method.plan_builds == 1
    plans = [p for r, p in zip(records, used) if r["kind"] == "sparse"]
    assert len(plans) == sum(r["kind"] == "sparse" for r in records) > 0
    assert all(p is plans[0] for p in plans)
    assert (plans[0].batch, plans[0].heads, plans[0].block_q, plans[0].block_k) == (1, 1, BLOCK, BLOCK)
    assert torch.equal(plans[0].to_block_mask()[0, 0], expected)
    # The shared plan is counted once in the memory stats.
    assert handle.stats().memory["plans"] == plans[0].nbytes()


def test_plans_rebuild_when_the_grid_changes_and_are_reused_per_geometry():
    pipe = wan_pipeline()
    handle = dit_accel.apply(pipe, method="radial", block_q=BLOCK, block_k=BLOCK, dense_steps=0)
    sizes = [
        (33, 48, 80, (9, 3, 5)),
        (25, 48, 80, (7, 3, 5)),  # frame count
        (33, 64, 96, (9, 4, 6)),  # resolution
        (33, 48, 80, (9, 3, 5)),  # back to the first geometry: its plan is reused
    ]
    used = _spy_plans(handle.method)
    for i, (frames, height, width, grid) in enumerate(sizes):
        used.clear()
        run_wan(pipe, steps=2, frames=frames, height=height, width=width)
        assert handle.method.plan_builds == min(i + 1, 3)
        expected = _expected_mask("wan", grid, 0, False)
        plans = [p for p in used if p is not None]
        assert plans and all(torch.equal(p.to_block_mask()[0, 0], expected) for p in plans)
        sparse = [r for r in handle.stats().records if r["kind"] == "sparse"]
        assert sparse and all(r["density"] == pytest.approx(_density(expected)) for r in sparse)


def test_explicit_knobs_override_the_family_defaults_and_last_steps_run_dense():
    pipe, run = _cogvideox()
    handle = dit_accel.apply(
        pipe,
        method="radial",
        block_q=BLOCK,
        block_k=BLOCK,
        decay=0.3,
        sink_frame=True,
        dense_steps=1,
        dense_layers=(-1,),
        dense_last_steps=1,
    )
    assert (handle.config.dense_steps, handle.config.dense_layers) == (1, (-1,))
    run()
    expected = _expected_mask("cogvideox", (9, 3, 5), 7, True, decay=0.3, sink_frame=True)
    assert not torch.equal(expected, _expected_mask("cogvideox", (9, 3, 5), 7, True))
    last = len(handle.layers) - 1
    for r in handle.stats().records:
        sparse = r["step"] not in (0, STEPS - 1) and handle.layers.index(r["layer"]) != last
        assert r["kind"] == ("sparse" if sparse else "dense"), r
        if sparse:
            assert r["density"] == pytest.approx(_density(expected))
    assert handle.method.plan_builds == 1


def test_single_frame_plan_is_full_and_runs_dense():
    pipe, run = _wan(frames=1)
    handle = dit_accel.apply(pipe, method="radial", block_q=BLOCK, block_k=BLOCK, dense_steps=0)
    run(steps=2)
    records = handle.stats().records
    # Layer 0 is a dense layer for Wan; the others have a full plan, run dense and say so in the stats.
    assert records and {(r["kind"], r["density"]) for r in records} == {("dense", 1.0), ("full_plan", 1.0)}
    assert all((r["kind"] == "dense") == r["layer"].endswith("blocks.0.attn1") for r in records)
    assert build_plan(1, 3, 5, block=BLOCK, decay=0.2, sink_frame=True).density() == 1.0


def test_radial_output_differs_from_dense_and_matches_its_plan():
    pipe, run = _wan()
    dit_accel.apply(pipe, method="dense")
    dense = run()
    dit_accel.apply(pipe, method="radial", block_q=BLOCK, block_k=BLOCK, dense_steps=0, dense_layers=())
    radial = run()
    # A user-made method serving the same plan through the generic sparse path: the same output.
    plan = build_plan(9, 3, 5, block=BLOCK, decay=0.2, sink_frame=True)

    class Fixed(dit_accel.SparseMethod):
        def plan_for(self, q, k, call):
            return plan

    dit_accel.apply(pipe, method=Fixed(), block_q=BLOCK, block_k=BLOCK)
    fixed = run()
    dit_accel.remove(pipe)
    assert (radial - dense).abs().max() > 1e-4
    assert torch.equal(radial, fixed)


@pytest.mark.parametrize("family", [pytest.param(f, id=f) for f in ("flux", "sd3", "pixart", "qwenimage")])
def test_image_families_are_refused(family):
    model, _ = TRANSFORMERS[family]()
    stock = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    with pytest.raises(ValueError, match="video method"):
        dit_accel.apply(model, method="radial")
    assert {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")} == stock


@pytest.mark.parametrize(
    "knobs, match",
    [
        pytest.param({"decay": 0.0}, "decay", id="decay-zero"),
        pytest.param({"decay": True}, "decay", id="decay-bool"),
        pytest.param({"window": "3d"}, "window", id="window"),
        pytest.param({"sink_frame": 1}, "sink_frame", id="sink-int"),
        pytest.param({"dense_last_steps": -1}, "dense_last_steps", id="last-negative"),
        pytest.param({"width": 3}, "bad options", id="unknown-option"),
        pytest.param({"block_q": 16, "block_k": 32}, "one block size", id="block-sizes"),
    ],
)
def test_bad_knobs(knobs, match):
    model, _ = TRANSFORMERS["wan"]()
    with pytest.raises(ValueError, match=match):
        dit_accel.apply(model, method="radial", **knobs)


def _call(method, q_len, grid, text_len=0, text_position=None, num_steps=None, step=0):
    info = ForwardInfo(
        "transformer", "default", step, num_steps, 0, 1, "none", grid, text_len, text_position, 1.0
    )
    q = torch.zeros(1, q_len, 2, 8)
    config = method.configure(
        dit_accel.SparseAttentionConfig(block_q=16, block_k=16, dense_steps=0), (_family("wan"),)
    )
    call = AttentionCall(
        layer="t.blocks.0.attn1",
        layer_index=1,
        num_layers=2,
        info=info,
        q=q,
        k=q,
        v=q,
        layout="bshd",
        dense_fn=lambda: q,
        kv_len=None,
        text_len=text_len,
        text_position=text_position,
        config=config,
    )
    return call


def test_sequence_must_be_the_grid_plus_text():
    method = RadialMethod()
    with pytest.raises(ValueError, match="9, 3, 5"):
        method.plan(_call(method, 9 * 15 + 3, (9, 3, 5)))
    with pytest.raises(ValueError, match="latent grid"):
        method.plan(_call(method, 135, None))
    plan, density = method.plan(_call(method, 9 * 15 + 7, (9, 3, 5), 7, "last"))
    assert torch.equal(plan.to_block_mask()[0, 0], _expected_mask("wan", (9, 3, 5), 7, False))
    assert density == plan.density()


def test_unconfigured_method_needs_its_knobs():
    method = create_method(dit_accel.SparseAttentionConfig(method="radial"))
    assert isinstance(method, RadialMethod) and method.decay is None
    call = _call(RadialMethod(), 135, (9, 3, 5))
    with pytest.raises(RuntimeError, match="decay"):
        method.plan(call)
    explicit = RadialMethod(decay=0.5, sink_frame=False)
    plan, _ = explicit.plan(call)
    assert torch.equal(plan.to_block_mask()[0, 0], block_mask(9, 3, 5, block=16, decay=0.5))


def test_dense_last_steps_needs_the_step_count():
    method = RadialMethod(dense_last_steps=2)
    assert method.dense_reason(_call(method, 135, (9, 3, 5), num_steps=10, step=8)) == "last steps"
    assert method.dense_reason(_call(method, 135, (9, 3, 5), num_steps=10, step=7)) is None
    assert method.dense_reason(_call(method, 135, (9, 3, 5), num_steps=None, step=8)) is None


def test_reference_family_defaults():
    # The reference's knobs (DESIGN.md §4.1): Wan decay 0.2, one dense layer, sink; HunyuanVideo decay 0.95,
    # no dense layer, no sink; 12 of 50 warm-up steps.
    wan = {"decay": 0.2, "sink_frame": True, "dense_layers": (0,), "dense_steps": 0.25}
    assert _family("wan").defaults["radial"] == wan
    hunyuan = {"decay": 0.95, "sink_frame": False, "dense_layers": (), "dense_steps": 0.25}
    assert _family("hunyuan_video").defaults["radial"] == hunyuan
    assert dit_accel.SparseAttentionConfig(dense_steps=0.25).num_dense_steps(50) == 12
    with_radial = {m for m in set(SUPPORTED.values()) if "radial" in _family(m).defaults}
    assert with_radial == {"wan", "hunyuan_video", "cogvideox", "ltx", "mochi"}
    assert all(_family(m).video == (m in with_radial) for m in SUPPORTED.values())
