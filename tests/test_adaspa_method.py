"""AdaspaMethod end to end on tiny pipelines (CPU, torch reference kernels).

Phase sequences in the stats (Wan separate CFG, CogVideoX batched CFG with text first, HunyuanVideo with
padded text last), the cached search under the stale LSE, CFG contexts with separate caches, the LSE memory
bound, new runs, the no-plan rule, the warm-up source of truth and the option checks.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from _tiny import TRANSFORMERS, cogvideox_pipeline, run_cogvideox, run_wan, wan_pipeline

import dit_accel
from dit_accel.methods import adaspa as adaspa_mod
from dit_accel.methods import composed, ledger
from dit_accel.methods.adaspa import AdaspaMethod, select_topk

D, F, C, S = "dense", "fused_search", "cached_search", "sparse"
BLOCKS = {"block_q": 16, "block_k": 16}


class Spy(AdaspaMethod):
    """AdaspaMethod that logs what every call did, and every block_mass call it makes (with ``spy_mass``)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.log: list[SimpleNamespace] = []
        self.mass: list[SimpleNamespace] = []
        self.current = None

    def attention(self, q, k, v, call):
        self.current = (call.context, call.step, call.layer)
        out = super().attention(q, k, v, call)
        self.log.append(
            SimpleNamespace(
                context=call.context,
                step=call.step,
                layer=call.layer,
                kind=call.label,
                entry=call.entry,
                plan=call.entry.plan,
                lse=call.entry.state.get("lse"),
                memory=self.memory(),
                keys=set(self.cache.entries()),
            )
        )
        return out

    def kinds(self, context, layer=None) -> list[str]:
        """The phase run at each step of ``context`` (all layers must agree unless ``layer`` is given)."""
        by_step: dict[int, set] = {}
        for r in self.log:
            if r.context == context and (layer is None or r.layer == layer):
                by_step.setdefault(r.step, set()).add(r.kind)
        assert all(len(v) == 1 for v in by_step.values()), by_step
        return [next(iter(by_step[s])) for s in sorted(by_step)]


@pytest.fixture(autouse=True)
def _fresh_log_once():
    composed._log_once.cache_clear()
    ledger._log_once.cache_clear()


@pytest.fixture
def spy_mass(monkeypatch):
    """Route adaspa's block_mass through a recorder: (context, step, layer, q, k, lse, W) per call."""

    def install(method: Spy):
        real = adaspa_mod.block_mass

        def recording(q, k, lse, block_q, block_k, **kw):
            W = real(q, k, lse, block_q, block_k, **kw)
            ctx, step, layer = method.current
            rec = SimpleNamespace(
                context=ctx, step=step, layer=layer, q=q, k=k, lse=lse.clone(), ptr=lse.data_ptr(), W=W
            )
            method.mass.append(rec)
            return W

        monkeypatch.setattr(adaspa_mod, "block_mass", recording)

    return install


def _stats_kinds(handle, context) -> list[str]:
    rows = [r for r in handle.stats().per_step() if r["context"] == context]
    assert all(len(r["kinds"]) == 1 for r in rows), rows
    return [next(iter(r["kinds"])) for r in rows]


def _drive(model, x, steps, num_steps=None, context="cond"):
    """Forwards of a bare transformer at the given step indices (as WanPipeline's cache_context does)."""
    outs = []
    for i in steps:
        with model.cache_context(context, step_index=i, num_inference_steps=num_steps), torch.no_grad():
            outs.append(model(**x, return_dict=False)[0])
    return outs


# --------------------------------------------------------------------------------------------------
# phase sequences on tiny pipelines
# --------------------------------------------------------------------------------------------------
def test_wan_separate_cfg_8_steps():
    pipe = wan_pipeline()
    method = Spy()
    handle = dit_accel.apply(pipe, method=method, **BLOCKS)
    out = run_wan(pipe, steps=8)
    assert torch.isfinite(out).all()
    expected = [D, D, F, S, S, C, S, S]
    for ctx in ("cond", "uncond"):
        assert method.kinds(ctx) == expected
        assert _stats_kinds(handle, ctx) == expected
    rows = handle.stats().per_step()
    for r in rows:
        kind = next(iter(r["kinds"]))
        if kind in (D, F):
            assert r["mean_density"] == 1.0
        else:
            assert 0.0 < r["mean_density"] < 1.0
        assert r["dense"] == (r["calls"] if kind == D else 0)
    mem = handle.stats().memory
    assert mem["lse"] == 0, "the LSE is released after the last cached search"
    assert mem["plans"] > 0 and mem["peak"] == max(r.memory["total"] for r in method.log)
    assert max(r.memory["lse"] for r in method.log) == 4 * LSE_FP32
    text = handle.stats().summary()
    assert "caches" in text and "peak" in text and "fused_search" in text and "cached_search" in text


def test_cogvideox_batched_cfg_text_first_5_steps():
    pipe = cogvideox_pipeline()
    method = Spy()
    handle = dit_accel.apply(pipe, method=method, **BLOCKS)
    out = run_cogvideox(pipe, steps=5)
    assert torch.isfinite(out).all()
    assert method.kinds("cond_uncond") == [D, F, S, C, S] == _stats_kinds(handle, "cond_uncond")
    layers = sorted({r.layer for r in method.log})
    assert len(layers) == 2
    assert method.log[-1].keys == {("cond_uncond", layer) for layer in layers}, "one entry per layer"
    for r in method.log:
        if r.kind in (F, C):
            assert r.plan.batch == 2 and r.lse is not None and r.lse.shape == (2, 4, 52)
        if r.kind in (C, S):
            mask = r.plan.to_block_mask()  # 52 tokens: text (7, first) in block 0
            assert mask[..., 0].all() and mask[:, :, 0].all()
            assert r.plan.density() < 1.0


def test_hunyuan_padded_text_last_5_steps():
    model, inputs = TRANSFORMERS["hunyuan_video"]()
    x = inputs(2)
    method = Spy()
    handle = dit_accel.apply(model, method=method, **BLOCKS)
    for t in (999.0, 800.0, 600.0, 400.0, 200.0):  # steps counted from the timestep
        y = {**x, "timestep": torch.tensor([t, t])}
        with model.cache_context("cond", num_inference_steps=5), torch.no_grad():
            out = model(**y, return_dict=False)[0]
        assert torch.isfinite(out).all()
    assert method.kinds("cond") == [D, F, S, C, S] == _stats_kinds(handle, "cond")
    for r in method.log:
        if r.kind in (C, S):
            # 67 tokens, 7 text tokens last (padded in sample 0): blocks 3 and 4 hold text.
            mask = r.plan.to_block_mask()
            assert mask[..., 3:].all() and mask[:, :, 3:].all()
            assert not mask[:, :, :3].all()


# --------------------------------------------------------------------------------------------------
# the cached search and CFG contexts
# --------------------------------------------------------------------------------------------------
def _hand_mass(q, k, lse, block):
    """W from plain torch in fp64: q, k [B, S, H, D], lse [B, H, S]."""
    q, k, lse = q.double(), k.double(), lse.double()
    s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    p = torch.exp(s - lse[..., None])
    n = -(-q.shape[1] // block)
    p = torch.nn.functional.pad(p, (0, n * block - p.shape[-1], 0, n * block - p.shape[-2]))
    return p.reshape(*p.shape[:2], n, block, n, block).sum((3, 5))


def test_cached_search_uses_the_stale_lse_and_contexts_never_share(spy_mass):
    pipe = wan_pipeline()
    method = Spy(head_adaptive=False)
    spy_mass(method)
    dit_accel.apply(pipe, method=method, **BLOCKS)
    run_wan(pipe, steps=5)  # dense, fused (1), sparse, cached (3), sparse
    fused = {(m.context, m.layer): m for m in method.mass if m.step == 1}
    cached = {(m.context, m.layer): m for m in method.mass if m.step == 3}
    assert len(method.mass) == 8 and set(fused) == set(cached) and len(fused) == 4
    for key, m in cached.items():
        ctx, layer = key
        stale = fused[key].lse
        assert torch.equal(m.lse, stale), f"{key}: the cached search did not get its fused-search LSE"
        assert m.ptr == fused[key].ptr, f"{key}: the cached search did not read the kept tensor"
        other = fused[("uncond" if ctx == "cond" else "cond", layer)]
        assert m.ptr != other.ptr, f"{key}: LSE shared between CFG contexts"
        if layer.endswith("blocks.1.attn1"):  # layer 0 sees the same latents in both contexts
            assert not torch.allclose(m.lse, other.lse), f"{key}: LSE values shared between CFG contexts"
        s = torch.einsum("bihd,bjhd->bhij", m.q.double(), m.k.double()) * m.q.shape[-1] ** -0.5
        fresh = torch.logsumexp(s, -1)
        assert (fresh - stale.double()).abs().max() > 1e-3, "q, k did not move: the test proves nothing"
        W_hand = _hand_mass(m.q, m.k, stale, 16)
        assert torch.allclose(m.W.double(), W_hand, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(W_hand, _hand_mass(m.q, m.k, fresh, 16), rtol=1e-3)
        searched = [r for r in method.log if (r.context, r.layer, r.step) == (ctx, layer, 3)][0]
        assert searched.kind == C and searched.entry.step == 3
        expected = select_topk(m.W, 0.8, block_q=16, block_k=16).to_block_mask()
        assert torch.equal(searched.plan.to_block_mask(), expected)
    # Separate entries per (context, layer); each context's sparse steps run its own latest plan.
    entries = {}
    for r in method.log:
        entries.setdefault((r.context, r.layer), set()).add(id(r.entry))
    assert (
        all(len(ids) == 1 for ids in entries.values()) and len({i for s in entries.values() for i in s}) == 4
    )
    for r in method.log:
        if r.kind == S:
            src = [x for x in method.log if (x.context, x.layer) == (r.context, r.layer) and x.kind in (F, C)]
            latest = [x for x in src if x.step <= r.step][-1]
            assert r.plan is latest.plan


# --------------------------------------------------------------------------------------------------
# memory bound
# --------------------------------------------------------------------------------------------------
LSE_FP32 = 1 * 2 * 45 * 4  # Wan tiny: B=1, H=2, S=45; 2 layers x 2 contexts = 4 entries


@pytest.mark.parametrize(
    "budget, fp16, dropped",
    [
        pytest.param(None, 0, 0, id="unbounded"),
        pytest.param(4 * LSE_FP32, 0, 0, id="fits-fp32"),
        pytest.param(4 * LSE_FP32 - 1, 4, 0, id="fp16"),
        pytest.param(2 * LSE_FP32 // 2 + LSE_FP32 // 4, 2, 2, id="drop"),
    ],
)
def test_memory_bound(budget, fp16, dropped, caplog):
    pipe = wan_pipeline()
    method = Spy(max_cache_bytes=budget)
    handle = dit_accel.apply(pipe, method=method, **BLOCKS)
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        run_wan(pipe, steps=5)
    held = max(r.memory["lse"] for r in method.log)
    assert held == 4 * LSE_FP32 // (2 if fp16 else 1) - dropped * LSE_FP32 // 2
    assert budget is None or held <= budget
    dtypes = {r.lse.dtype for r in method.log if r.lse is not None}
    assert dtypes == ({torch.float16} if fp16 else {torch.float32})
    mem = handle.stats().memory
    assert (mem["downgraded"].get("lse", 0), mem["dropped"].get("lse", 0)) == (fp16, dropped)
    assert mem["peak"] == max(r.memory["total"] for r in method.log)
    if dropped:
        # Fused searches run cond before uncond: the uncond layers are over the budget.
        assert method.kinds("cond") == [D, F, S, C, S]
        assert method.kinds("uncond") == [D, F, S, S, S]
        assert all(r.entry.step == 1 for r in method.log if r.context == "uncond" and r.step == 4)
        assert "state budget" in caplog.text and "'lse'" in caplog.text
    else:
        assert method.kinds("uncond") == [D, F, S, C, S]


# --------------------------------------------------------------------------------------------------
# runs, outputs, the no-plan rule, warm-up, options
# --------------------------------------------------------------------------------------------------
def test_a_new_run_starts_over():
    pipe = wan_pipeline()
    method = Spy()
    handle = dit_accel.apply(pipe, method=method, **BLOCKS)
    run_wan(pipe, steps=5)
    first = list(method.log)
    method.log.clear()
    run_wan(pipe, steps=8)
    assert method.kinds("cond") == [D, D, F, S, S, C, S, S] == _stats_kinds(handle, "cond")
    assert not {id(r.entry) for r in first} & {id(r.entry) for r in method.log}
    assert method.log[0].keys == {("cond", method.log[0].layer)}, "entries of the previous run survived"
    assert handle.stats().memory["peak"] == max(r.memory["total"] for r in method.log)


def test_fused_step_is_dense_and_sparse_steps_run_the_plan():
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    with torch.no_grad():
        ref = model(**x, return_dict=False)[0]
    for sparsity, same in ((0.0, True), (0.8, False)):
        handle = dit_accel.apply(model, method="adaspa", sparsity=sparsity, head_adaptive=False, **BLOCKS)
        fused, sparse = _drive(model, x, steps=(1, 2), num_steps=5)
        assert [r["kind"] for r in handle.stats().records] == [F, F, S, S]
        assert torch.allclose(fused, ref, atol=1e-5, rtol=0)
        assert torch.allclose(sparse, ref, atol=1e-5, rtol=0) == same


def test_a_step_without_a_plan_runs_a_fused_search(caplog):
    model, inputs = TRANSFORMERS["wan"]()
    handle = dit_accel.apply(model, method="adaspa", **BLOCKS)
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        _drive(model, inputs(1), steps=(5, 6, 7), num_steps=8)  # started mid-run: 5 is a cached search
    assert [r["kind"] for r in handle.stats().records] == [F, F, S, S, S, S]
    assert "no searched plan" in caplog.text


@pytest.mark.parametrize(
    "knobs, steps, expected",
    [
        pytest.param({}, 6, [D, F, S, S, C, S], id="default-0.2"),
        pytest.param({"warmup": 0.25}, 6, [D, D, F, S, C, S], id="warmup-rounds-half-up"),
        pytest.param({"dense_steps": 0.25}, 6, [D, F, S, S, C, S], id="dense_steps-rounds-down"),
        pytest.param({"dense_steps": 3}, 6, [D, D, D, F, C, S], id="dense_steps-count"),
        pytest.param({"dense_steps": 0}, 5, [F, S, S, C, S], id="no-warmup"),
        pytest.param({"dense_layers": (0,)}, 5, None, id="dense-layer"),
        pytest.param({"warmup": 1, "search_at": (2, 3)}, 5, [D, F, C, C, S], id="indices"),
        pytest.param({"search_at": ()}, 5, [D, F, S, S, S], id="no-cached-search"),
    ],
)
def test_schedule_knobs(knobs, steps, expected):
    model, inputs = TRANSFORMERS["wan"]()
    method = Spy(**{k: v for k, v in knobs.items() if k in ("warmup", "search_at")})
    config = {k: v for k, v in knobs.items() if k not in ("warmup", "search_at")}
    dit_accel.apply(model, method=method, **BLOCKS, **config)
    _drive(model, inputs(1), steps=range(steps), num_steps=steps)
    layers = sorted({r.layer for r in method.log})
    if expected is None:
        assert method.kinds("cond", layers[0]) == [D] * steps
        assert method.kinds("cond", layers[1]) == [D, F, S, C, S]
    else:
        assert method.kinds("cond") == expected
    if not knobs.get("search_at", True):
        assert all(r.lse is None for r in method.log), "no cached search follows: no LSE is kept"


def test_unknown_step_count(caplog):
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    method = Spy()
    dit_accel.apply(model, method=method, **BLOCKS)
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        _drive(model, x, steps=range(3))
    assert method.kinds("cond") == [D, D, D] and "number of steps is unknown" in caplog.text
    method = Spy(warmup=1, search_at=3)
    dit_accel.apply(model, method=method, **BLOCKS)
    _drive(model, x, steps=range(6))
    assert method.kinds("cond") == [D, F, S, C, S, S]


def test_coverage_selection_runs():
    pipe = wan_pipeline()
    handle = dit_accel.apply(pipe, method="adaspa", tau=0.5, **BLOCKS)
    run_wan(pipe, steps=5)
    assert _stats_kinds(handle, "cond") == [D, F, S, C, S]
    assert all(r["density"] < 1.0 for r in handle.stats().records if r["kind"] == S)


@pytest.mark.parametrize(
    "knobs, match",
    [
        pytest.param({"sparsity": 0.8, "tau": 0.9}, "not both", id="sparsity-and-tau"),
        pytest.param({"tau": 0.9, "head_adaptive": True}, "exclude tau", id="tiers-with-tau"),
        pytest.param({"sparsity": 1.0}, "sparsity", id="sparsity-1-with-tiers"),
        pytest.param({"tau": 0.0}, "tau", id="tau-0"),
        pytest.param({"warmup": 1.5}, "warmup", id="warmup"),
        pytest.param({"search_at": (-1,)}, "search_at", id="search_at"),
        pytest.param({"max_cache_bytes": -1}, "max_cache_bytes", id="budget"),
        pytest.param({"warmup": 0.2, "dense_steps": 2}, "warm-up twice", id="warmup-twice"),
        pytest.param({"density": 0.1}, "bad options", id="unknown-option"),
    ],
)
def test_option_errors(knobs, match):
    model, _ = TRANSFORMERS["wan"]()
    with pytest.raises(ValueError, match=match):
        dit_accel.apply(model, method="adaspa", **knobs)


def test_registered_by_name():
    model, _ = TRANSFORMERS["wan"]()
    handle = dit_accel.apply(model, method="adaspa", sparsity=0.9, search_at=(0.5, 0.75))
    assert isinstance(handle.method, AdaspaMethod)
    assert (handle.method.sparsity, handle.method.search_at, handle.method.head_adaptive) == (
        0.9,
        (0.5, 0.75),
        True,
    )
