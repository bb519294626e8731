"""Re-ttention in the processors: schedules on tiny pipelines of several families, the refresh identity,
CFG contexts with their own statistics, the ramp and clamp, the state budget's fallbacks, the three bases,
and the knob checks (CPU, torch reference kernels)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from _tiny import (
    TRANSFORMERS,
    cogvideox_pipeline,
    pixart_pipeline,
    run_cogvideox,
    run_pixart,
    run_wan,
    wan_pipeline,
)

import dit_accel
from dit_accel.methods import RettentionMethod, composed, ledger, rettention
from dit_accel.methods.base import AttentionCall

D, R, C, SR, S, F = "dense", "refresh", "corrected", "search_refresh", "sparse", "full_plan"
BLOCKS = {"block_q": 16, "block_k": 16}


@pytest.fixture(autouse=True)
def _fresh_log_once():
    for module in (composed, ledger, rettention):
        module._log_once.cache_clear()


def _kinds(handle, context, layer=None) -> list[str]:
    by_step: dict[int, set] = {}
    for r in handle.stats().records:
        if r["context"] == context and (layer is None or r["layer"] == layer):
            by_step.setdefault(r["step"], set()).add(r["kind"])
    assert all(len(v) == 1 for v in by_step.values()), by_step
    return [next(iter(by_step[s])) for s in sorted(by_step)]


def _record_stores(handle) -> list:
    """(context, layer, refreshed_at, value) of every value the method stores in its ledger, in order."""
    stored = []
    store = handle.method.cache.store

    def recording(entry, name, value, placement=None, in_place=False):
        stored.append((entry.context, entry.layer, entry.marks.get("refreshed_at"), value))
        store(entry, name, value, placement, in_place)

    handle.method.cache.store = recording
    return stored


@pytest.fixture
def sparse_calls(monkeypatch):
    """Every run_sparse call: (context, step, layer, rho_offset, clamp, corrected)."""
    seen = []
    real = AttentionCall.run_sparse

    def spy(self, plan, return_lse=False, correction=None, rho_offset=0.0, clamp_rho=True):
        seen.append((self.context, self.step, self.layer, rho_offset, clamp_rho, correction is not None))
        return real(self, plan, return_lse, correction, rho_offset, clamp_rho)

    monkeypatch.setattr(AttentionCall, "run_sparse", spy)
    return seen


# --------------------------------------------------------------------------------------------------
# schedules in the stats
# --------------------------------------------------------------------------------------------------
def test_wan_separate_cfg_schedule_and_ramp(sparse_calls):
    pipe = wan_pipeline()
    handle = dit_accel.apply(pipe, method="rettention", density=0.3, refresh_every=3, dense_steps=2, **BLOCKS)
    stored = _record_stores(handle)
    out = run_wan(pipe, steps=9, frames=33)
    assert torch.isfinite(out).all()
    expected = [D, D, R, C, C, R, C, C, R]
    for ctx in ("cond", "uncond"):
        # Layer 0 is no dense layer for rettention: the Wan default belongs to radial.
        assert _kinds(handle, ctx) == expected
    assert handle.config.dense_layers is None
    offsets = {(c, s): round(off, 6) for c, s, _, off, _, corr in sparse_calls if corr}
    assert offsets == {
        (c, s): round(0.04 * ((s - 2) % 3 - 1), 6) for c in ("cond", "uncond") for s in (3, 4, 6, 7)
    }
    assert all(clamp for *_, clamp, _ in sparse_calls)
    mem = handle.stats().memory
    assert mem["correction"] > 0 and mem["dropped"] == {} and mem["downgraded"] == {}
    # Refreshes at steps 2, 5, 8 store one correction per (context, layer), each its own tensors.
    assert sorted({(c, step) for c, _, step, _ in stored}) == [
        (c, s) for c in ("cond", "uncond") for s in (2, 5, 8)
    ]
    assert len(stored) == 12 and len({id(v.residual) for *_, v in stored}) == 12
    cond = {layer: v for c, layer, step, v in stored if c == "cond" and step == 2}
    uncond = {layer: v for c, layer, step, v in stored if c == "uncond" and step == 2}
    last = handle.layers[-1]
    assert not torch.allclose(cond[last].residual, uncond[last].residual), "contexts keep their own R"
    assert handle.stats().summary().count("corrected") >= 4


def test_refresh_at_fractions_keep_the_schedule_shape_at_any_step_count(sparse_calls):
    """``refresh_at`` names the refreshes after the first (fractions of the run or indices): a front-loaded
    schedule, the same shape at 10 and 50 steps, with the ramp counted from each refresh."""
    from dit_accel.methods.schedule import Schedule

    fifty = Schedule(50, warmup=0.1, refresh_at=(0.2, 0.4))
    assert fifty.refresh_steps == (5, 10, 20) and fifty.phases().count("sparse") == 42
    assert Schedule(30, warmup=0.1, refresh_at=(0.2, 0.4)).refresh_steps == (3, 6, 12)
    # before or at the first pass, or past the run: dropped; indices and fractions mix
    assert Schedule(20, warmup=4, refresh_at=(0.1, 4, 9, 0.75, 25)).refresh_steps == (4, 9, 15)
    pipe = wan_pipeline()
    handle = dit_accel.apply(
        pipe, method="rettention", density=0.3, dense_steps=0.2, refresh_at=(0.4, 0.7), **BLOCKS
    )
    run_wan(pipe, steps=10, frames=33)
    for ctx in ("cond", "uncond"):
        assert _kinds(handle, ctx) == [D, D, R, C, R, C, C, R, C, C]
    offsets = {s: round(off, 6) for c, s, _, off, _, corr in sparse_calls if corr and c == "cond"}
    assert offsets == {3: 0.0, 5: 0.0, 6: 0.04, 8: 0.0, 9: 0.04}
    assert handle.method.correction.knobs()["refresh_at"] == (0.4, 0.7)
    assert handle.method.correction.refresh_every is None


def test_cogvideox_batched_cfg_text_first_family_schedule():
    pipe = cogvideox_pipeline()
    handle = dit_accel.apply(pipe, method="rettention", density=0.3, **BLOCKS)
    assert handle.method.correction.refresh_every == 5 and handle.config.dense_steps == 0.3
    stored = _record_stores(handle)
    out = run_cogvideox(pipe, steps=12)
    assert torch.isfinite(out).all()
    # The paper's CogVideoX schedule scaled to 12 steps: int(0.3 * 12) = 3 dense, refresh every 5.
    assert _kinds(handle, "cond_uncond") == [D] * 3 + [R, C, C, C, C, R, C, C, C]
    ((plan, _),) = handle.method._plans.values()
    mask = plan.to_block_mask()
    assert mask[..., 0].all() and mask[:, :, 0].all(), "text (first) rows and columns are kept"
    assert all(v.rho.shape[0] == 2 for *_, v in stored), "one statistics row per CFG half"


def test_pixart_image_family_defaults():
    pipe = pixart_pipeline()
    handle = dit_accel.apply(pipe, method="rettention", density=0.3, **BLOCKS)
    run_pixart(pipe, steps=20)
    # The paper's PixArt schedule: dense 0-4, refresh at 5, 10, 15.
    kinds = _kinds(handle, handle.stats().records[0]["context"])
    assert [i for i, k in enumerate(kinds) if k == R] == [5, 10, 15]
    assert kinds[:5] == [D] * 5 and set(kinds[6:10]) == {C}
    assert handle.method.pattern.per_frame is False, "image families get the band"


def test_hunyuan_text_last_padded():
    model, inputs = TRANSFORMERS["hunyuan_video"]()
    x = inputs(2)
    handle = dit_accel.apply(
        model, method="rettention", density=0.3, dense_steps=1, refresh_every=2, **BLOCKS
    )
    for t in (999.0, 800.0, 600.0, 400.0, 200.0):
        y = {**x, "timestep": torch.tensor([t, t])}
        with model.cache_context("cond", num_inference_steps=5), torch.no_grad():
            out = model(**y, return_dict=False)[0]
        assert torch.isfinite(out).all()
    assert _kinds(handle, "cond") == [D, R, C, R, C]
    ((plan, _),) = handle.method._plans.values()
    mask = plan.to_block_mask()
    assert mask[..., 3:].all() and mask[:, :, 3:].all(), "text (last) rows and columns are kept"


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------
def _drive(model, x, steps, num_steps, context="cond"):
    outs = []
    for i in steps:
        with model.cache_context(context, step_index=i, num_inference_steps=num_steps), torch.no_grad():
            outs.append(model(**x, return_dict=False)[0])
    return outs


def test_refresh_step_is_dense_and_corrected_step_differs_from_plain_sparse():
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    with torch.no_grad():
        ref = model(**x, return_dict=False)[0]
    handle = dit_accel.apply(
        model, method="rettention", density=0.3, per_frame=False, dense_steps=0, refresh_every=4, **BLOCKS
    )
    refresh, corrected = _drive(model, x, steps=(0, 1), num_steps=4)
    assert [r["kind"] for r in handle.stats().records] == [R, R, C, C]
    torch.testing.assert_close(refresh, ref, atol=1e-5, rtol=0)
    # Same q, k, v at the next step (same inputs): rho * O_sparse + R rebuilds the dense output exactly.
    torch.testing.assert_close(corrected, ref, atol=1e-5, rtol=0)
    dit_accel.apply(model, method="window", density=0.3, dense_steps=0, **BLOCKS)  # the same band
    (plain,) = _drive(model, x, steps=(1,), num_steps=4)
    assert (plain - ref).abs().max() > 1e-3, (
        "the plain sparse output must differ for the test to mean anything"
    )


def test_clamp_and_ramp_reach_the_kernel(sparse_calls):
    model, inputs = TRANSFORMERS["wan"]()
    dit_accel.apply(
        model,
        method="rettention",
        density=0.3,
        per_frame=False,
        dense_steps=0,
        refresh_every=10,
        ramp=0.25,
        clamp=False,
        **BLOCKS,
    )
    _drive(model, inputs(1), steps=range(4), num_steps=10)
    corrected = [(s, off, clamp) for _, s, _, off, clamp, corr in sparse_calls if corr]
    assert sorted({(s, off, clamp) for s, off, clamp in corrected}) == [
        (1, 0.0, False),
        (2, 0.25, False),
        (3, 0.5, False),
    ]


@pytest.mark.parametrize(
    "knobs, kinds",
    [
        pytest.param({"base": "window", "density": 0.3}, [D, R, C, C, R, C], id="window"),
        pytest.param({"base": "radial"}, [D, R, C, C, R, C], id="radial"),
        pytest.param(
            {"base": "adaspa", "sparsity": 0.7, "search_at": (4,)}, [D, SR, C, C, SR, C], id="adaspa"
        ),
    ],
)
def test_bases(knobs, kinds):
    pipe = wan_pipeline()
    handle = dit_accel.apply(pipe, method="rettention", dense_steps=1, refresh_every=3, **knobs, **BLOCKS)
    out = run_wan(pipe, steps=6, frames=33)
    assert torch.isfinite(out).all()
    assert handle.method.base == knobs["base"]
    layer = handle.layers[1]
    assert _kinds(handle, "cond", layer) == kinds
    densities = [r["density"] for r in handle.stats().records if r["kind"] == C]
    assert densities and all(0.0 < d < 1.0 for d in densities)


def test_corrected_layers_and_dense_layers():
    pipe = wan_pipeline()
    handle = dit_accel.apply(
        pipe,
        method="rettention",
        density=0.3,
        dense_steps=1,
        refresh_every=3,
        corrected_layers=(1,),
        **BLOCKS,
    )
    run_wan(pipe, steps=4, frames=33)
    first, second = handle.layers
    assert _kinds(handle, "cond", first) == [D, S, S, S], "uncorrected layers run their base pattern"
    assert _kinds(handle, "cond", second) == [D, R, C, C]


# --------------------------------------------------------------------------------------------------
# the state budget
# --------------------------------------------------------------------------------------------------
def _correction_bytes(dtype_bytes: int) -> int:
    # Wan tiny at 33 frames: B=1, H=2, S=135, D=12; rho fp32 per row.
    rows = 1 * 2 * 135
    return rows * 12 * dtype_bytes + rows * 4


@pytest.mark.parametrize(
    "budget, dtype, dropped",
    [
        pytest.param(None, torch.float32, 0, id="unbounded"),
        pytest.param(4 * _correction_bytes(4), torch.float32, 0, id="fits-fp32"),
        pytest.param(4 * _correction_bytes(2), torch.bfloat16, 0, id="bf16"),
        # Nothing fits all four: float8 (half of bf16's residual bytes) for two, the other two dropped.
        pytest.param(2 * _correction_bytes(2) + 10, torch.float8_e4m3fn, 2, id="fp8-then-drop"),
    ],
)
def test_state_budget(budget, dtype, dropped, caplog):
    pipe = wan_pipeline()
    handle = dit_accel.apply(
        pipe,
        method="rettention",
        density=0.3,
        dense_steps=1,
        refresh_every=10,
        max_state_bytes=budget,
        **BLOCKS,
    )
    stored = _record_stores(handle)
    with caplog.at_level(logging.INFO, logger="dit_accel"):
        run_wan(pipe, steps=3, frames=33)
    mem = handle.stats().memory
    assert mem["dropped"].get("correction", 0) == dropped
    assert budget is None or mem["peak"] - mem["plans"] <= budget
    kept = [v for *_, v in stored]
    assert len(kept) == 4 - dropped and {c.residual.dtype for c in kept} == {dtype}
    uncond = _kinds(handle, "uncond")
    assert uncond == ([D, R, S] if dropped else [D, R, C]), "layers over the budget run uncorrected"
    assert "correction state" in caplog.text, "the first call says where the state will live"
    if budget is not None and dtype != torch.float32:
        assert "max_state_bytes" in caplog.text


def test_state_dtype_knob_and_new_runs_drop_state():
    pipe = wan_pipeline()
    handle = dit_accel.apply(
        pipe, method="rettention", density=0.3, dense_steps=1, state_dtype="fp8", **BLOCKS
    )
    stored = _record_stores(handle)
    run_wan(pipe, steps=3, frames=33)
    kept = [v for *_, v in stored]
    assert {c.residual.dtype for c in kept} == {torch.float8_e4m3fn} and all(
        c.residual_scale is not None for c in kept
    )
    assert handle.stats().memory["correction"] > 0
    assert len(handle.method.cache) == 0, "the pipeline's end-of-call reset dropped the state"


def _correction(dtype=torch.bfloat16, value=1.0):
    shape = (1, 2, 8)
    scale = torch.ones(shape) if dtype == torch.float8_e4m3fn else None
    residual = torch.full((*shape, 4), value).to(dtype)
    return dit_accel.kernels.SoftmaxCorrection(torch.full(shape, value), residual, scale)


def test_ledger_writes_in_place_only_over_the_same_layout():
    """``store(in_place=True)`` keeps the held object (its identity is what a CUDA graph's key holds) and
    writes the new values into it; another layout, or nothing held, stores the new value itself."""
    cache = ledger.StateLedger()
    entry = cache.entry("cond", "blocks.0", key=None)
    first = _correction()
    cache.store(entry, "correction", first, in_place=True)
    assert entry.state["correction"] is first
    cache.store(entry, "correction", _correction(value=2.0), in_place=True)
    assert entry.state["correction"] is first and torch.equal(first.rho, torch.full((1, 2, 8), 2.0))
    assert torch.equal(first.residual, torch.full((1, 2, 8, 4), 2.0, dtype=torch.bfloat16))
    downgraded = _correction(torch.float8_e4m3fn, value=3.0)
    cache.store(entry, "correction", downgraded, in_place=True)
    assert entry.state["correction"] is downgraded
    replaced = _correction(torch.float8_e4m3fn, value=4.0)
    cache.store(entry, "correction", replaced)
    assert entry.state["correction"] is replaced and torch.equal(downgraded.rho, torch.full((1, 2, 8), 3.0))


# --------------------------------------------------------------------------------------------------
# knobs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "knobs, match",
    [
        pytest.param({"base": "radial", "density": 0.1}, "takes", id="foreign-knob"),
        pytest.param({"base": "adaspa", "decay": 0.2}, "radial", id="foreign-knob-names-its-base"),
        pytest.param({"base": "nope"}, "base", id="base"),
        pytest.param({"refresh_every": 0}, "refresh_every", id="period"),
        pytest.param({"refresh_every": 5, "refresh_at": (0.5,)}, "not both", id="period-and-steps"),
        pytest.param({"refresh_at": (1.5,)}, "refresh_at", id="refresh-at-fraction"),
        pytest.param({"refresh_at": "0.5"}, "refresh_at", id="refresh-at-type"),
        pytest.param({"ramp": -0.1}, "ramp", id="ramp"),
        pytest.param({"clamp": 1}, "clamp", id="clamp"),
        pytest.param({"state_dtype": "int8"}, "state_dtype", id="dtype"),
        pytest.param({"refresh": "two-pass"}, "refresh", id="refresh"),
        pytest.param({"density": 0.0}, "density", id="density"),
        pytest.param({"max_state_bytes": -5}, "max_state_bytes", id="budget"),
        pytest.param({"width": 3}, "bad options", id="unknown"),
    ],
)
def test_knob_errors(knobs, match):
    model, _ = TRANSFORMERS["wan"]()
    with pytest.raises(ValueError, match=match):
        dit_accel.apply(model, method="rettention", **knobs)


def test_registered_by_name_with_defaults():
    model, _ = TRANSFORMERS["wan"]()
    handle = dit_accel.apply(model, method="rettention")
    method = handle.method
    assert isinstance(method, RettentionMethod) and method.base == "window"
    assert method.pattern.per_frame is True and method.pattern.density == 0.1, "video: the per-frame window"
    assert method.correction.refresh_every == 5 and method.correction.clamp is True
    assert "rettention" in dit_accel.methods.method_names()
    assert {"base", "density", "refresh_every", "ramp", "clamp"} <= set(
        dit_accel.methods.method_knobs("rettention")
    )


def test_refresh_paths_agree_and_auto_picks_by_density():
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    outs = {}
    for path in ("fused", "split"):
        dit_accel.apply(
            model,
            method="rettention",
            per_frame=False,
            density=0.3,
            dense_steps=0,
            refresh_every=4,
            refresh=path,
            **BLOCKS,
        )
        outs[path] = _drive(model, x, steps=(0, 1, 2), num_steps=4)
    for a, b in zip(outs["fused"], outs["split"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    correction = rettention.Correction()
    entry = SimpleNamespace(plan=None, density=None)
    wan13 = dict(batch=1, heads=12, q_len=32760, k_len=32760, head_dim=128)
    embedded = dict(batch=1, heads=6, q_len=2496, k_len=2496, head_dim=64)
    for device, density, shape, path in (
        ("cuda", 0.08, wan13, "split"),
        ("cuda", 0.35, wan13, "split"),
        ("cuda", 0.45, wan13, "fused"),
        ("cpu", 0.08, wan13, "fused"),
        ("cuda", 0.08, embedded, "split"),
        ("cuda", 0.6, embedded, "fused"),
    ):
        plan = SimpleNamespace(density=lambda d=density: d)
        call = SimpleNamespace(device=torch.device(device), entry=entry, **shape)
        assert correction._refresh_path(plan, call) == path


def test_per_frame_window_caps_the_automatic_blocks():
    """With automatic blocks the per-frame window uses blocks of at most 1/8 of a frame: 16 tokens on the
    embedded model's 192-token frames (the automatic 128 would span two thirds of a frame), the automatic 128
    at Wan's real sizes. The band, explicit blocks and frames that do not match the sequence keep theirs."""
    from dit_accel.methods.window import WindowPattern

    frame = WindowPattern(0.05, per_frame=True)
    assert frame.max_block((13, 12, 16), 2496, 2496, 0) == 16  # embedded model, 49 x 192 x 256
    assert frame.max_block((21, 30, 52), 32760, 32760, 0) == 128  # Wan2.1-1.3B 480p
    assert frame.max_block((33, 45, 80), 119056, 119056, 256) == 256  # HunyuanVideo 720p: above 128, no cap
    assert frame.max_block((13, 12, 16), 2500, 2500, 0) is None  # not the grid's tokens: the band runs
    assert frame.max_block(None, 2496, 2496, 0) is None
    assert WindowPattern(0.05).max_block((13, 12, 16), 2496, 2496, 0) is None  # the band has no frames

    model, _ = TRANSFORMERS["wan"]()
    g = torch.Generator().manual_seed(0)
    # latent grid 4 x 16 x 16: 1,024 tokens, automatic blocks of 64; a 256-token frame holds 8 blocks of 32
    x = {
        "hidden_states": torch.randn(1, 16, 4, 32, 32, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
    }
    for knobs, block in [({}, 32), ({"per_frame": False}, 64), ({"block_q": 64}, 64)]:
        handle = dit_accel.apply(
            model, method="rettention", density=0.1, dense_steps=0, refresh_every=2, **knobs
        )
        _drive(model, x, range(2), 2)
        assert {plan.block_q for plan, _ in handle.method._plans.values()} == {block}, knobs
        assert {plan.block_k for plan, _ in handle.method._plans.values()} == {block}, knobs
        handle.remove()
