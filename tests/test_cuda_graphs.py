"""``cuda_graphs=True`` (``dit_accel.graphs``): which forwards are captured and replayed, that a replay gives
the eager forward's output and stats, and where forwards run eagerly instead.

On the CPU the device's graphs are replaced by recorded ones (``tests/_graphs.py``): they replay the tensor
operations of the captured forward without its Python, as a CUDA graph does, so a key that misses something
the forward's Python decides per step shows up as a wrong output. The GPU test at the end captures real
CUDA graphs."""

from __future__ import annotations

import logging

import pytest
import torch
from _graphs import RecordedGraphs, use_recorded_graphs
from _tiny import cogvideox_pipeline, run_cogvideox, run_wan, wan, wan_pipeline

import dit_accel
from dit_accel import graphs
from dit_accel.methods.rettention import Correction

STEPS = 10


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    """The recorded graphs stand in for CUDA, where attention never takes the CPU path of
    ``backend="torch"`` (its plan checks read tensors on the host, which a capture refuses): the torch
    backend runs the reference here, eager and captured alike."""
    from dit_accel.kernels import torch_sparse

    monkeypatch.setattr(torch_sparse, "available", lambda *tensors: False)


METHODS = {
    "dense": {"method": "dense"},
    "window": {"method": "window", "density": 0.5, "dense_steps": 3},
    "radial": {"method": "radial", "dense_steps": 3, "block_q": 16},
    "adaspa": {"method": "adaspa", "sparsity": 0.5, "dense_steps": 3, "search_at": (5,), "block_q": 16},
    "rettention (no ramp)": {"method": "rettention", "ramp": 0.0, "dense_steps": 3, "refresh_every": 5},
    "rettention": {"method": "rettention", "dense_steps": 3, "refresh_every": 5, "clamp": False},
}


def _render(knobs: dict, graphs: bool, family: str = "wan", runs: int = 1):
    torch.manual_seed(0)
    if family == "wan":  # 3 x 6 x 10 latent tokens: 12 blocks of 16 per row
        build, run = wan_pipeline, lambda pipe, steps: run_wan(pipe, steps=steps, height=96, width=160)
    else:
        build, run = cogvideox_pipeline, run_cogvideox
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    handle = dit_accel.apply(pipe, backend="torch", cuda_graphs=graphs, **knobs)
    recorded = use_recorded_graphs(handle) if graphs else []
    outs, stats = [], []
    for _ in range(runs):
        outs.append(run(pipe, steps=STEPS))
        stats.append(handle.stats())
    return outs, stats, recorded


def _records(stats):
    return [{k: v for k, v in r.items() if k != "time_ms"} for r in stats.records]


@pytest.mark.parametrize("name", list(METHODS))
def test_replayed_forwards_match_eager(name):
    (eager,), (eager_stats,), _ = _render(METHODS[name], graphs=False)
    (graphed,), (graph_stats,), recorded = _render(METHODS[name], graphs=True)
    assert torch.equal(torch.as_tensor(eager), torch.as_tensor(graphed))
    assert _records(graph_stats) == _records(eager_stats)
    counts = graph_stats.graphs
    assert counts["replayed"] >= 4, counts
    assert counts["replayed"] + counts.get("captured", 0) + counts["eager"] == 2 * STEPS  # cond + uncond
    assert sum(g.replays for r in recorded for g in r.made) == counts["replayed"] + counts["captured"]


def test_which_forwards_replay():
    """window, 3 dense steps of 10, cond and uncond: each kind of forward runs eagerly once, is captured the
    next time and replayed after. Dense forwards read no per-context state: the two contexts share one graph.
    The first sparse forward of each context builds its plans (the ledger changes), so its second one is the
    first of its kind."""
    _, (stats,), _ = _render(METHODS["window"], graphs=True)
    counts = stats.graphs
    # dense: cond 0 eager, uncond 0 captured, the 4 after replayed; sparse, per context: 3 eager (plans
    # built), 4 eager (first with the plans), 5 captured, 6-9 replayed
    assert counts["eager"] == 1 + 2 * 2 and counts["captured"] == 1 + 2 and counts["replayed"] == 4 + 2 * 4
    assert counts["eager: first forward of its kind"] == 5


def test_batched_cfg_and_a_second_run():
    """CogVideoX (one forward per step, batched CFG): the second run captures anew and matches eager."""
    eager, _, _ = _render(METHODS["window"], graphs=False, family="cogvideox", runs=2)
    graphed, stats, _ = _render(METHODS["window"], graphs=True, family="cogvideox", runs=2)
    for a, b in zip(eager, graphed):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert stats[1].graphs["captured"] == 2 and stats[1].graphs["replayed"] == 5


def test_the_double_catches_a_per_step_value_baked_into_a_graph(monkeypatch):
    """re-ttention's ramp moves its output scale every sparse step. The kernel reads it from a device tensor
    that ``prepare_replay`` writes before each capture and replay, so corrected steps replay with the right
    scale. Without that write the capture records the forward's own write of the captured step's value, every
    replay repeats it, and the recorded graphs show the wrong frames."""
    knobs = {"method": "rettention", "dense_steps": 2, "refresh_every": 8, "ramp": 0.05, "clamp": False}
    (eager,), _, _ = _render(knobs, graphs=False)
    (right,), (stats,), _ = _render(knobs, graphs=True)
    assert torch.equal(torch.as_tensor(eager), torch.as_tensor(right))
    corrected = [r for r in stats.records if r["kind"] == "corrected"]
    assert len({r["step"] for r in corrected}) >= 5 and stats.graphs["replayed"] >= 2 * 4, stats.graphs
    monkeypatch.setattr(Correction, "prepare_replay", lambda self, method, context, step: None)
    (wrong,), (stats,), _ = _render(knobs, graphs=True)
    assert stats.graphs["replayed"] > 0
    assert not torch.allclose(torch.as_tensor(eager), torch.as_tensor(wrong))


def test_graphs_of_an_earlier_state_are_dropped(monkeypatch):
    """re-ttention on adaspa searches a new plan at its refreshes (3 and 6): each new plan makes the graphs
    of the plans before it unreachable, and they are dropped rather than kept alive with what they hold."""
    live = []
    new_graph = RecordedGraphs._new_graph

    def counting(self):
        live.append(len(self._graphs))
        return new_graph(self)

    monkeypatch.setattr(RecordedGraphs, "_new_graph", counting)
    knobs = {
        "method": "rettention",
        "base": "adaspa",
        "sparsity": 0.5,
        "ramp": 0.0,
        "dense_steps": 3,
        "refresh_every": 3,
        "search_at": (3, 6),
        "block_q": 16,
    }
    (eager,), _, _ = _render(knobs, graphs=False)
    (graphed,), (stats,), _ = _render(knobs, graphs=True)
    assert torch.equal(torch.as_tensor(eager), torch.as_tensor(graphed))
    searches = {r["step"] for r in stats.records if "search" in r["kind"]}
    assert searches == {3, 6}
    # dense, then per context one graph of the first plans (step 5) and one of the second (step 8)
    assert len(live) == stats.graphs["captured"] == 5
    assert max(live) <= 1  # at each capture: at most the other CFG context's graph of the same state


def test_rettention_graphs_outlive_a_refresh():
    """Under cuda_graphs=True a refresh writes its statistics into the tensors held (the ledger's
    ``in_place``), so the corrected forward captured after the first refresh replays after every later one,
    reading the new statistics and the new ramp offset: one corrected graph per context for the whole
    run, and eager's frames."""
    knobs = {"method": "rettention", "dense_steps": 2, "refresh_every": 3, "ramp": 0.05, "clamp": False}
    (eager,), _, _ = _render(knobs, graphs=False)
    (graphed,), (stats,), recorded = _render(knobs, graphs=True)
    assert torch.equal(torch.as_tensor(eager), torch.as_tensor(graphed))
    assert {r["step"] for r in stats.records if r["kind"] == "refresh"} == {2, 5, 8}
    counts = stats.graphs
    # dense: cond 0 eager, uncond 0 captured, step 1 replayed; per context: 2 refresh, 3 first of its kind,
    # 4 captured, 5 refresh, 6 and 7 replayed, 8 refresh, 9 replayed
    assert counts["captured"] == 1 + 2 and counts["eager: first forward of its kind"] == 1 + 2
    assert counts["replayed"] == 2 + 2 * 3
    assert counts["eager: the method searches, refreshes or varies at this step"] == 2 * 3
    # three graphs in all, each replayed once at its capture (that gives its output) and then at every replay
    assert sorted(g.replays for g in recorded[0].made) == [1 + 2, 1 + 3, 1 + 3]


def test_the_double_catches_statistics_left_stale(monkeypatch):
    """The control for the test above: a ledger that kept the held statistics without writing the new ones
    into them replays the corrected graphs on the first refresh's statistics, and the frames differ."""
    from dit_accel.methods import ledger

    knobs = {"method": "rettention", "dense_steps": 2, "refresh_every": 3, "ramp": 0.0}
    (eager,), _, _ = _render(knobs, graphs=False)
    monkeypatch.setattr(ledger, "_copy_into", lambda held, value: True)
    (stale,), (stats,), _ = _render(knobs, graphs=True)
    assert stats.graphs["replayed"] == 2 + 2 * 3
    assert not torch.allclose(torch.as_tensor(eager), torch.as_tensor(stale))


def test_searches_run_eagerly():
    _, (stats,), _ = _render(METHODS["adaspa"], graphs=True)
    searches = {(r["context"], r["step"]) for r in stats.records if "search" in r["kind"]}
    assert searches == {(c, s) for c in ("cond", "uncond") for s in (3, 5)}
    assert stats.graphs["eager: the method searches, refreshes or varies at this step"] == len(searches)


def test_fused_blocks_are_captured_with_the_forward(monkeypatch):
    """dit_accel's fused-block hook (fuse_blocks) is not another hook: it is captured and replayed."""
    from dit_accel.processors import wan as wan_processors

    fused = []
    step = wan_processors.block_step
    monkeypatch.setattr(wan_processors, "block_step", lambda *a, **k: fused.append(1) or step(*a, **k))
    knobs = {"method": "window", "density": 0.5, "dense_steps": 3, "fuse_blocks": True}
    (eager,), (eager_stats,), _ = _render(knobs, graphs=False)
    eager_steps, fused[:] = len(fused), []
    (graphed,), (graph_stats,), _ = _render(knobs, graphs=True)
    assert torch.equal(torch.as_tensor(eager), torch.as_tensor(graphed))
    assert _records(graph_stats) == _records(eager_stats)
    counts = graph_stats.graphs
    assert counts["replayed"] >= 4 and not any("another hook" in k for k in counts), counts
    # the fused steps ran in every eager and captured forward, and only there (replays skip the Python)
    per_forward = eager_steps // (2 * STEPS)
    assert per_forward > 0 and len(fused) == per_forward * (counts["eager"] + counts["captured"])


@pytest.mark.parametrize("reason", ["timing", "grad", "step cache", "cpu"])
def test_forwards_run_eagerly_with_a_reason(reason, caplog):
    graphs._log_info_once.cache_clear()  # each reason is logged once per process
    torch.manual_seed(0)
    pipe = wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    knobs = {"method": "window", "density": 0.5, "backend": "torch", "cuda_graphs": True}
    if reason == "timing":
        knobs["timing"] = True
    handle = dit_accel.apply(pipe, **knobs)
    if reason != "cpu":
        use_recorded_graphs(handle)
    if reason == "step cache":
        from diffusers.hooks import FirstBlockCacheConfig

        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))
    with caplog.at_level(logging.INFO, logger="dit_accel"):
        if reason == "grad":
            with torch.enable_grad():
                pipe.transformer(**_forward_args(pipe))
        else:
            run_wan(pipe, steps=3)
    expected = {
        "timing": "timing=True",
        "grad": "grad is enabled",
        "step cache": "another hook is installed (fbc_leader_block_hook)",
        "cpu": "an input tensor is not on a cuda device",
    }[reason]
    counts = handle.stats().graphs
    assert counts["eager"] == counts[f"eager: {expected}"] > 0
    assert "replayed" not in counts and "captured" not in counts
    assert expected in caplog.text


def _forward_args(pipe):
    return {**wan()[1](1), "return_dict": False}


def test_a_failed_capture_falls_back_once(caplog, monkeypatch):
    """A forward that reads the device from the host cannot be captured: logged, run eagerly, not retried."""
    (eager,), _, _ = _render({"method": "dense"}, graphs=False)
    pipe = wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    original = type(pipe.transformer).forward

    def reads_back(self, *args, **kwargs):
        kwargs["timestep"].max().item()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe.transformer), "forward", reads_back)
    handle = dit_accel.apply(pipe, method="dense", cuda_graphs=True)
    (recorded,) = use_recorded_graphs(handle)
    with caplog.at_level(logging.WARNING, logger="dit_accel"):
        out = run_wan(pipe, steps=STEPS, height=96, width=160)
    counts = handle.stats().graphs
    assert len(recorded.made) == 1  # tried once (cond and uncond share the dense key), then remembered
    assert counts["eager: capture failed"] == 2 * STEPS - 1
    assert "CUDA graph capture" in caplog.text and "host read" in caplog.text
    assert torch.equal(torch.as_tensor(out), torch.as_tensor(eager))


def test_remove_and_config():
    pipe = wan_pipeline()
    stock = pipe.transformer.forward
    dit_accel.apply(pipe, method="dense", cuda_graphs=True)
    dit_accel.remove(pipe)
    assert pipe.transformer.forward == stock
    with pytest.raises(ValueError, match="cuda_graphs must be a bool"):
        dit_accel.apply(pipe, method="dense", cuda_graphs="yes")


def _gpu_render(knobs: dict, graphs: bool, compiled: bool = False):
    """A tiny Wan pipeline in bf16 on the GPU (Triton kernels; ``compiled``: inductor-compiled blocks):
    its latents and stats."""
    from dit_accel.pipelines.wrapped import compile_blocks

    torch.manual_seed(0)
    pipe = wan_pipeline().to("cuda", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    if compiled:
        compile_blocks(pipe)
    handle = dit_accel.apply(pipe, cuda_graphs=graphs, **knobs)
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(1, 8, 32, generator=g).to("cuda", torch.bfloat16) for _ in range(2)]
    out = pipe(
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
        height=96,
        width=160,
        num_frames=9,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).frames
    return out.float().cpu(), handle.stats()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "name", ["dense", "window", "adaspa", "rettention (no ramp)", "rettention", "rettention+fuse_blocks"]
)
def test_gpu_graphs_match_eager(name):
    """Real CUDA graphs: the same latents as eager (the kernels are deterministic) and the same stats."""
    knobs = dict(METHODS[name.split("+")[0]], fuse_blocks=name.endswith("+fuse_blocks"))
    eager, eager_stats = _gpu_render(knobs, graphs=False)
    graphed, stats = _gpu_render(knobs, graphs=True)
    assert stats.graphs["replayed"] >= 4, stats.graphs
    assert _records(stats) == _records(eager_stats)
    torch.testing.assert_close(graphed, eager, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_graphs_over_compiled_blocks():
    """Regionally compiled blocks (inductor) inside graphed forwards: the same latents as compiled eager."""
    eager, _ = _gpu_render(METHODS["window"], graphs=False, compiled=True)
    graphed, stats = _gpu_render(METHODS["window"], graphs=True, compiled=True)
    assert stats.graphs["replayed"] >= 4, stats.graphs
    torch.testing.assert_close(graphed, eager, atol=0, rtol=0)
