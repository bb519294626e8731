"""The step index, step count, CFG layout and geometry the processors see, in every CFG mode, on real tiny
pipelines; run resets; the tracker's rules on their own."""

import pytest
import torch
from _tiny import (
    Recorder,
    cogvideox_pipeline,
    flux_pipeline,
    pixart_pipeline,
    run_cogvideox,
    run_flux,
    run_pixart,
    run_sd3,
    run_wan,
    sd3_pipeline,
    steps_by_context,
    wan_pipeline,
)
from diffusers.hooks.hooks import CacheContext

import dit_accel
from dit_accel.tracking import Geometry, StepTracker


def _forwards(calls, **match):
    """One record per transformer forward (the first replaced layer of each component)."""
    return [c for c in calls if c["layer_index"] == 0 and all(c[k] == v for k, v in match.items())]


def test_wan_separate_cfg_with_step_index():
    pipe = wan_pipeline()
    rec = Recorder()
    dit_accel.apply(pipe, method=rec)
    run_wan(pipe, steps=3)
    assert steps_by_context(rec.calls) == {"cond": [0, 1, 2], "uncond": [0, 1, 2]}
    fw = _forwards(rec.calls)
    assert {c["cfg"] for c in fw} == {"separate"}
    assert {c["num_steps"] for c in fw} == {3}
    assert {c["grid"] for c in fw} == {(3, 3, 5)}
    assert {c["q_len"] for c in fw} == {45}
    assert {c["text_len"] for c in fw} == {0}


def test_wan_repeated_runs_reset_and_new_resolution():
    pipe = wan_pipeline()
    rec = Recorder()
    handle = dit_accel.apply(pipe, method=rec)
    run_wan(pipe, steps=2)
    run_wan(pipe, steps=3)
    run_wan(pipe, steps=2, height=64, width=48, frames=5)
    fw = _forwards(rec.calls, context="cond")
    assert [c["step"] for c in fw] == [0, 1, 0, 1, 2, 0, 1]
    assert [c["num_steps"] for c in fw] == [2, 2, 3, 3, 3, 2, 2]
    runs = [c["run"] for c in fw]
    assert runs[0] < runs[2] < runs[5] and runs[0] == runs[1] and runs[2] == runs[4]
    assert fw[-1]["grid"] == (2, 4, 3) and fw[-1]["q_len"] == 24
    assert handle.stats().records[0]["run"] == runs[-1]


def test_wan22_two_transformers_share_one_step_count():
    pipe = wan_pipeline(two_experts=True)
    rec = Recorder()
    handle = dit_accel.apply(pipe, method=rec)
    assert sorted(handle.transformers) == ["transformer", "transformer_2"]
    run_wan(pipe, steps=4)
    fw = _forwards(rec.calls, context="cond")
    assert [c["step"] for c in fw] == [0, 1, 2, 3]
    components = [c["component"] for c in fw]
    assert components[0] == "transformer" and components[-1] == "transformer_2"
    assert {c["num_steps"] for c in fw} == {4}
    layers = {c["layer"] for c in rec.calls}
    assert "transformer.blocks.0.attn1" in layers and "transformer_2.blocks.0.attn1" in layers


def test_wan_num_videos_per_prompt():
    pipe = wan_pipeline()
    rec = Recorder()
    dit_accel.apply(pipe, method=rec)
    run_wan(pipe, steps=2, videos_per_prompt=2)
    fw = _forwards(rec.calls)
    assert {c["batch"] for c in fw} == {2}
    assert steps_by_context(rec.calls) == {"cond": [0, 1], "uncond": [0, 1]}


@pytest.mark.parametrize("prompts", [pytest.param(1, id="batch1"), pytest.param(2, id="batch2")])
def test_cogvideox_batched_cfg(prompts):
    pipe = cogvideox_pipeline()
    rec = Recorder()
    dit_accel.apply(pipe, method=rec)
    run_cogvideox(pipe, steps=3, prompts=prompts)
    assert steps_by_context(rec.calls) == {"cond_uncond": [0, 1, 2]}
    fw = _forwards(rec.calls)
    assert {(c["cfg"], c["batch"], c["num_steps"]) for c in fw} == {("batched", 2 * prompts, 3)}
    assert {(c["text_len"], c["text_position"], c["grid"]) for c in fw} == {(7, "first", (3, 3, 5))}


def test_cogvideox_without_guidance_is_not_batched():
    pipe = cogvideox_pipeline()
    rec = Recorder()
    dit_accel.apply(pipe, method=rec)
    run_cogvideox(pipe, steps=2, guidance=1.0)
    assert {(c["cfg"], c["batch"]) for c in _forwards(rec.calls)} == {("none", 1)}


def test_sd3_batched_cfg_without_context_or_reset():
    pipe = sd3_pipeline()
    rec = Recorder()
    dit_accel.apply(pipe, method=rec)
    run_sd3(pipe, steps=3)
    run_sd3(pipe, steps=3)
    run_sd3(pipe, steps=2, prompts=2)
    fw = _forwards(rec.calls)
    assert [c["step"] for c in fw] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert {c["context"] for c in fw} == {"default"}
    assert [c["batch"] for c in fw] == [2] * 6 + [4] * 2
    assert {c["cfg"] for c in fw} == {"batched"}
    assert [c["num_steps"] for c in fw] == [3] * 6 + [2] * 2
    assert len({c["run"] for c in fw}) == 3


def test_sd3_heun_calls_the_model_twice_per_step():
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = sd3_pipeline(FlowMatchHeunDiscreteScheduler())
    rec = Recorder()
    dit_accel.apply(pipe, method=rec)
    run_sd3(pipe, steps=3)
    run_sd3(pipe, steps=3)
    fw = _forwards(rec.calls)
    assert [c["step"] for c in fw] == [0, 1, 1, 2, 2] * 2
    assert {c["num_steps"] for c in fw} == {3}


def test_flux_guidance_distilled_and_true_cfg():
    pipe = flux_pipeline()
    rec = Recorder()
    dit_accel.apply(pipe, method=rec)
    run_flux(pipe, steps=3)
    assert steps_by_context(rec.calls) == {"cond": [0, 1, 2]}
    rec.calls.clear()
    run_flux(pipe, steps=2, true_cfg=2.0)
    assert steps_by_context(rec.calls) == {"cond": [0, 1], "uncond": [0, 1]}
    fw = _forwards(rec.calls)
    assert {(c["cfg"], c["batch"], c["grid"], c["text_len"]) for c in fw} == {("separate", 1, (1, 3, 4), 9)}
    single = [c for c in rec.calls if ".single_transformer_blocks." in c["layer"]]
    assert single and {(c["text_len"], c["text_position"], c["q_len"]) for c in single} == {(9, "first", 21)}


def test_pixart_batched_cfg_detected_from_latents():
    pipe = pixart_pipeline()
    rec = Recorder()
    dit_accel.apply(pipe, method=rec)
    run_pixart(pipe, steps=3)
    run_pixart(pipe, steps=2, guidance=1.0)
    fw = _forwards(rec.calls)
    assert [c["step"] for c in fw] == [0, 1, 2, 0, 1]
    assert [(c["cfg"], c["batch"]) for c in fw] == [("batched", 2)] * 3 + [("none", 1)] * 2
    assert [c["num_steps"] for c in fw] == [3, 3, 3, 2, 2]


def test_fractional_dense_steps_follow_the_scheduler():
    pipe = wan_pipeline()
    handle = dit_accel.apply(pipe, method="window", density=0.5, block_q=16, block_k=16, dense_steps=0.5)
    run_wan(pipe, steps=4)
    kinds = {(r["context"], r["step"]): r["kind"] for r in handle.stats().records}
    assert [kinds[("cond", s)] for s in range(4)] == ["dense", "dense", "sparse", "sparse"]
    assert [kinds[("uncond", s)] for s in range(4)] == ["dense", "dense", "sparse", "sparse"]


def _begin(tracker, context=None, t=None, grid=(1, 2, 3), batch=1):
    x = torch.zeros(batch, 1)
    return tracker.begin("transformer", context, None if t is None else torch.tensor([t]), x, Geometry(grid))


@pytest.mark.parametrize(
    "timesteps, steps",
    [
        pytest.param([999, 800, 600, 999, 800], [0, 1, 2, 0, 1], id="first-timestep-returns"),
        pytest.param([900, 700, 700, 500, 950], [0, 1, 1, 2, 0], id="repeat-then-direction-flip"),
        pytest.param([0, 250, 500, 750, 100], [0, 1, 2, 3, 0], id="rising-then-restart"),
    ],
)
def test_tracker_counts_steps_by_timestep(timesteps, steps):
    tracker = StepTracker()
    assert [_begin(tracker, t=t).step for t in timesteps] == steps


def test_tracker_explicit_step_index_grid_change_and_listeners():
    tracker = StepTracker()
    runs = []
    tracker.add_listener(runs.append)
    ctx = [CacheContext("cond", step_index=i, num_inference_steps=3) for i in (0, 1, 2, 0)]
    infos = [_begin(tracker, c) for c in ctx]
    assert [i.step for i in infos] == [0, 1, 2, 0]
    assert infos[0].run == infos[2].run < infos[3].run
    assert _begin(tracker, CacheContext("cond", step_index=1)).step == 1
    info = _begin(tracker, CacheContext("cond", step_index=2), grid=(1, 4, 4))
    assert info.step == 2 and info.run == infos[3].run + 1
    assert runs == [infos[3].run, info.run]
    assert info.num_steps == 2, "without a step count the previous run's count of the context is used"
    assert _begin(tracker, t=500).num_steps is None
