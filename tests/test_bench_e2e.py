"""The end-to-end benchmark (benchmarks/bench_e2e.py): its smoke run on the CPU, the JSON it writes, and the
composition of a run's time from per-step times."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _bench import load_benchmark

from dit_accel.methods import method_names
from dit_accel.methods.adaspa import AdaspaSchedule

SMOKE_ROWS = "stock,dense,adaspa_0.8,rettention_window_0.05,balanced"


def _load(monkeypatch):
    return load_benchmark("bench_e2e", monkeypatch)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        bench = _load(mp)
        out = tmp_path_factory.mktemp("e2e")
        argv = ["--smoke", "--geometry", "smoke", "--rows", SMOKE_ROWS, "--compile-rows", "dense"]
        result = bench.main([*argv, "--out-dir", str(out)])["smoke"]
        yield bench, result, out / "e2e_smoke_cpu.json"
    finally:
        mp.undo()


def test_segments_and_classify(monkeypatch):
    bench = _load(monkeypatch)
    kinds = ["dense", "dense", "fused_search", "sparse", "sparse", "cached_search", "sparse"]
    assert bench.segments(kinds) == [
        ("dense", 0, 2),
        ("fused_search", 2, 3),
        ("sparse", 3, 5),
        ("cached_search", 5, 6),
        ("sparse", 6, 7),
    ]
    rec = [{"kind": "dense"}, {"kind": "sparse"}, {"kind": "sparse"}]
    assert bench.classify(rec, 3) == "sparse"
    assert bench.classify(rec[:1], 1) == "dense"
    assert bench.classify([], 3) == "skipped"
    assert bench.classify(rec[:2], 3) == "partial"
    assert bench.classify([{"kind": "refresh"}, {"kind": "sparse"}], 2) == "refresh+sparse"


def test_json_is_written_and_complete(smoke):
    _, result, path = smoke
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(result, default=str))
    assert {"geometry", "steps", "versions", "device", "knobs", "rows", "checks", "plan"} <= set(on_disk)
    assert on_disk["geometry"]["calls_per_step"] == 2 and on_disk["steps"] == 3
    assert {"torch", "triton", "diffusers"} <= set(on_disk["versions"])


def test_composition_is_the_sum_over_the_schedule(smoke):
    _, result, _ = smoke
    steps, contexts = result["steps"], result["geometry"]["contexts"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert {r["row"] for r in ok} >= {"stock", "dense", "adaspa_0.8", "stock+taylorseer"}
    for row in ok:
        assert len(row["per_step_ms"]) == steps
        assert math.isclose(row["total_s"], sum(row["per_step_ms"]) / 1e3, rel_tol=1e-9)
        # every (context, step) is covered by exactly one segment, and the segments sum to the steps
        per_step = [0.0] * steps
        covered = {ctx: [0] * steps for ctx in contexts}
        for seg in row["segments"]:
            assert seg["kind"] == row["schedule"][seg["context"]][seg["start"]]
            for s in range(seg["start"], seg["stop"]):
                per_step[s] += seg["ms_per_call"]
                covered[seg["context"]][s] += 1
        assert all(c == [1] * steps for c in covered.values()), row["row"]
        assert per_step == pytest.approx(row["per_step_ms"], rel=1e-12)
        kinds = row["step_kinds"]
        assert sum(k["steps"] for k in kinds.values()) == steps
        assert sum(k["calls"] for k in kinds.values()) == steps * len(contexts)
        assert set(kinds) == {k for ctx in contexts for k in row["schedule"][ctx]}
    stock = next(r for r in ok if r["row"] == "stock" and not r["compiled"])
    assert stock["speedup"] == 1.0


def test_schedules_come_from_the_methods(smoke):
    _, result, _ = smoke
    rows = {(r["row"], r["compiled"]): r for r in result["rows"]}
    adaspa = rows[("adaspa_0.8", False)]
    assert adaspa["schedule"]["cond"] == list(AdaspaSchedule(3).phases())
    assert adaspa["schedule_verified"] and adaspa["output_finite"]
    assert all(s["seen_kind"] == s["kind"] for s in adaspa["timed_segments"])
    assert adaspa["step_kinds"]["fused_search"]["attention_ms_per_call"] is not None
    assert rows[("stock", False)]["schedule"]["cond"] == ["dense"] * 3
    # stock has no dit_accel stats: its attention time is the dense row's (dense calls run the stock op)
    stock_dense = rows[("stock", False)]["step_kinds"]["dense"]
    assert stock_dense["attention_source"] == "dense row (eager)"
    assert (
        stock_dense["attention_ms_per_call"]
        == rows[("dense", False)]["step_kinds"]["dense"]["attention_ms_per_call"]
    )
    assert rows[("dense", False)]["dense_equals_stock"] is True
    # the dense steps of a method take the dense row's time
    window_sources = {s["source"] for s in adaspa["segments"] if s["kind"] == "dense"}
    assert window_sources == {"dense row"}


@pytest.mark.parametrize(
    "geometry, batch, text_tokens, contexts",
    [
        ("smoke_flux", 1, 8, ["cond"]),
        ("smoke_qwenimage", 1, 8, ["cond", "uncond"]),
        ("smoke_sd3", 2, 8, ["cond"]),
        ("smoke_pixart", 2, 0, ["cond"]),
    ],
)
def test_image_geometries_run_with_their_inputs(
    monkeypatch, tmp_path, geometry, batch, text_tokens, contexts
):
    """Image families: FLUX's packed tokens and ids (one call per step), Qwen-Image's image shapes and true
    CFG (two calls per step), SD3's and PixArt's batched CFG (one call of batch 2 on duplicated latents;
    neither model has ``cache_context``), text tokens counted where self-attention runs over them (joint
    attention), and the image presets' adaspa schedule read from the method."""
    bench = _load(monkeypatch)
    rows = "stock,dense,balanced"
    result = bench.main(["--smoke", "--geometry", geometry, "--rows", rows, "--out-dir", str(tmp_path)])
    result = result[geometry]
    g = result["geometry"]
    assert g["contexts"] == contexts and g["calls_per_step"] == len(contexts) and g["latent"][0] == batch
    assert g["grid"] == [1, 12, 16] and g["tokens"] == 12 * 16 + text_tokens
    rows = {r["row"]: r for r in result["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), {n: r.get("error") for n, r in rows.items()}
    assert rows["dense"]["dense_equals_stock"] is True
    balanced = rows["balanced"]
    assert balanced["schedule"]["cond"] == list(AdaspaSchedule(3).phases())
    assert balanced["schedule_verified"] and balanced["output_finite"]
    assert all(s["seen_kind"] == s["kind"] for s in balanced["timed_segments"])
    assert balanced["speedup"] is not None


def test_image_geometries_hold_the_pipelines_defaults(monkeypatch):
    geometries = _load(monkeypatch).GEOMETRIES
    assert geometries["flux_1024"]["steps"] == 28 and math.prod(geometries["flux_2048"]["grid"]) == 128 * 128
    assert geometries["sd35_large_1024"]["steps"] == 28 and geometries["sd35_large_1024"]["latent"][0] == 2
    assert (
        geometries["pixart_sigma_2048"]["steps"] == 20 and geometries["pixart_sigma_2048"]["grid"][1] == 128
    )
    assert geometries["qwenimage_1328"]["init_in_dtype"] and geometries["qwenimage_1328"]["steps"] == 50


def test_build_model_in_dtype_keeps_the_default_dtype(monkeypatch):
    """A model too large for fp32 weights is initialised in its dtype; the process's default dtype stays."""
    bench = _load(monkeypatch)
    spec = bench.PROBES["qwenimage"]
    model = bench.build_model("qwenimage", spec["config"], "cpu", torch.bfloat16, init_in_dtype=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


def test_rettention_row_when_available(smoke):
    if "rettention" not in method_names():
        pytest.skip("rettention is not in this checkout")
    _, result, _ = smoke
    row = next(r for r in result["rows"] if r["row"] == "rettention_window_0.05" and not r["compiled"])
    assert row["status"] == "ok" and row["schedule_verified"], row.get("error")
    assert {"refresh", "corrected"} <= set(row["schedule"]["cond"])


def test_rows_this_checkout_lacks_are_skipped_with_a_reason(smoke):
    _, result, _ = smoke
    rows = {r["row"]: r for r in result["rows"] if not r["compiled"]}
    if "rettention" not in method_names():
        assert rows["rettention_window_0.05"]["status"] == "skipped"
        assert "rettention" in rows["rettention_window_0.05"]["reason"]
    try:
        from dit_accel.pipelines import presets  # noqa: F401
    except ImportError:
        assert rows["balanced"]["status"] == "skipped" and "preset" in rows["balanced"]["reason"]


def test_compiled_row_records_its_outcome(smoke):
    _, result, _ = smoke
    row = next(r for r in result["rows"] if r["row"] == "dense" and r["compiled"])
    assert row["status"] in ("ok", "failed")
    assert "graph_breaks" in row
    if row["status"] == "failed":
        assert row["error"]


def test_step_cache_rows_count_served_steps(smoke):
    _, result, _ = smoke
    (cost,) = [c for c in result["cache_costs"] if not c["compiled"]]
    row = next(r for r in result["rows"] if r["row"] == "stock+taylorseer")
    # TaylorSeer with interval 2 from step 1 (the smoke config): step 1 is served, steps 0 and 2 computed
    assert row["schedule"]["cond"] == ["dense", "skipped", "dense"]
    assert row["per_step_ms"][1] == pytest.approx(2 * cost["served_ms_per_call"])
    assert row["step_kinds"]["skipped"]["attention_ms_per_call"] == 0.0
    combo = next(r for r in result["rows"] if r["row"] == "adaspa_0.8+taylorseer")
    assert combo["status"] == "ok" and "skipped" in combo["schedule"]["cond"]


def test_whole_loop_checks_ran(smoke):
    _, result, _ = smoke
    checks = {c["row"]: c for c in result["checks"]}
    assert set(checks) == {"stock", "adaspa_0.8", "adaspa_0.8+taylorseer"}
    for c in checks.values():
        assert "error" not in c, c
        assert c["pipeline_s"] > 0 and c["output_finite"]


def test_report_rewrites_the_marked_region(smoke, tmp_path):
    bench, _, path = smoke
    doc = tmp_path / "e2e.md"
    doc.write_text(f"# title\n\nprose\n\n{bench.REPORT_BEGIN}\nold\n{bench.REPORT_END}\n\nafter\n")
    text = bench.write_report([str(path)], str(doc))
    body = doc.read_text()
    assert body.startswith("# title\n\nprose\n") and body.endswith("after\n")
    assert "old" not in body and text in body
    assert "| adaspa_0.8 | no |" in text and "stock+taylorseer" in text


def test_dense_steps_sweep_speed_column(smoke):
    _, result, path = smoke
    sweep = load_benchmark("sweep_dense_steps")
    rows, _ = sweep.sweep_rows([0.0, 0.34], [m for m in sweep.METHODS if m["label"] == "adaspa"])
    assert rows == {
        "adaspa dense_steps=0": {"method": "adaspa", "dense_steps": 0.0},
        "adaspa dense_steps=0.34": {"method": "adaspa", "dense_steps": 0.34},
    }
    table = [{"method": label, "knobs": knobs} for label, knobs in rows.items()]
    speed = sweep.speed_column(table, str(path))["rows"]
    # 0.34 of 3 steps is the measured row's own schedule (1 dense step): the same speedup
    measured = next(r for r in result["rows"] if r["row"] == "adaspa_0.8" and not r["compiled"])
    assert speed["adaspa dense_steps=0.34"]["dense_steps_of_run"] == 1
    assert speed["adaspa dense_steps=0.34"]["speedup"] == pytest.approx(measured["speedup"], rel=1e-9)
    # no warm-up: a fused search at step 0 and a sparse step the 3-step row never timed
    assert "no time for ['sparse']" in speed["adaspa dense_steps=0"]["note"]


def test_dense_steps_sweep_saves_after_every_prompt(tmp_path, monkeypatch):
    """A sweep that is stopped keeps the prompts it finished: the JSON is written after each one."""
    sweep = load_benchmark("sweep_dense_steps", monkeypatch)
    written = []
    write = sweep.write_json
    monkeypatch.setattr(sweep, "write_json", lambda p, data: written.append(dict(data)) or write(p, data))
    out = tmp_path / "sweep.json"
    argv = ["--device", "cpu", "--prompts", "2", "--methods", "radial", "--warmups", "0", "--steps", "2"]
    result = sweep.main([*argv, "--out", str(out)])
    assert [w.get("prompts_done") for w in written] == [1, 2, None]
    assert [r["method"] for r in written[0]["rows"]] == ["dense (reference)", "radial dense_steps=0"]
    assert json.loads(out.read_text())["rows"] == result["rows"] and out.with_suffix(".md").exists()


@pytest.mark.parametrize("family", ["sd3", "pixart", "flux"])
def test_probe_schedule_is_what_the_pipeline_runs_without_a_step_index(monkeypatch, family):
    """The image pipelines pass no step index (FLUX: ``cache_context("cond")`` alone; SD3, PixArt: no
    context): the step tracker counts their timesteps. The benchmark hands it the step index instead; both
    must give the preset the same schedule."""
    import _tiny

    import dit_accel
    from dit_accel.pipelines.presets import get_preset

    bench = _load(monkeypatch)
    preset = get_preset(family, "balanced")
    knobs = {"method": preset.method, **dict(preset.knobs)}
    steps = 10
    pipe = getattr(_tiny, f"{family}_pipeline")()
    pipe.set_progress_bar_config(disable=True)
    handle = dit_accel.apply(pipe, backend="torch", block_q=16, block_k=16, **knobs)
    try:
        getattr(_tiny, f"run_{family}")(pipe, steps=steps)
        calls: dict = {}
        for r in handle.stats().records:
            calls.setdefault(r["step"], []).append(r)
        ran = [bench.classify(calls[s], len(handle.layers)) for s in range(steps)]
    finally:
        dit_accel.remove(pipe)
    assert {"fused_search", "sparse", "cached_search"} <= set(ran)
    assert bench.probe_schedule(family, knobs, steps, ("cond",))["cond"] == ran


def test_compile_only_keeps_eager_stock_as_the_denominator(monkeypatch):
    bench = _load(monkeypatch)
    argv = ["--smoke", "--geometry", "smoke", "--rows", "stock,dense", "--plan-only", "--step-cache", "off"]
    plan = bench.main([*argv, "--compile-rows", "stock,dense", "--compile", "only"])["smoke"]["plan"]["rows"]
    assert [(r["row"], r["compiled"]) for r in plan] == [("stock", False), ("stock", True), ("dense", True)]
    plan = bench.main([*argv, "--rows", "dense", "--compile-rows", "dense", "--compile", "only"])["smoke"][
        "plan"
    ]["rows"]
    assert [(r["row"], r["compiled"]) for r in plan] == [("dense", True)]


def test_fused_rows_carry_the_knob_and_skip_families_without_fused_blocks(monkeypatch):
    bench = _load(monkeypatch)
    rows = {r["name"]: r for r in bench.ROWS}
    knobs = bench.row_knobs(rows["balanced"], "wan")
    assert knobs["fuse_blocks"] is True and knobs["method"] == "rettention"  # Wan's preset fuses
    knobs = bench.row_knobs(rows["balanced_unfused"], "wan")
    assert knobs["fuse_blocks"] is False and knobs["method"] == "rettention"  # the preset's, less the knob
    assert bench.row_knobs(rows["dense_fused"], "wan") == {"method": "dense", "fuse_blocks": True}
    with pytest.raises(bench.Skip, match="no fused block forward"):
        bench.row_knobs(rows["dense_fused"], "flux")
    with pytest.raises(bench.Skip, match="no fused block forward"):
        bench.row_knobs(rows["balanced_unfused"], "hunyuan_video")


def test_fused_rows_take_their_dense_steps_from_the_fused_dense_row(monkeypatch, tmp_path):
    """A row that fuses the blocks runs its dense steps fused: they take ``dense_fused``'s time, not the
    unfused ``dense`` row's, and ``dense_fused`` times its own steps instead of copying ``dense``."""
    bench = _load(monkeypatch)
    rows = {r["name"]: r for r in bench.ROWS}
    assert bench._dense_source(rows["radial"], "wan", False) == "dense"
    assert bench._dense_source(rows["balanced_unfused"], "wan", False) == "dense"
    assert bench._dense_source(rows["balanced"], "wan", False) == "dense_fused"
    assert bench._dense_source(rows["balanced"], "wan", True) == "dense"  # compiled: stock blocks
    assert bench._dense_source(rows["dense_fused"], "wan", False) is None
    assert bench._dense_source(rows["stock"], "wan", False) is None
    argv = [
        "--smoke",
        "--geometry",
        "smoke",
        "--rows",
        "stock,dense,dense_fused,balanced",
        "--no-check",
    ]
    argv += ["--steps", "10", "--compile", "off", "--step-cache", "off"]  # 10 steps: one dense step (0.1)
    result = bench.main([*argv, "--out-dir", str(tmp_path)])["smoke"]
    got = {r["row"]: r for r in result["rows"]}
    assert all(got[n]["status"] == "ok" for n in ("dense", "dense_fused", "balanced"))
    assert {s["source"] for s in got["dense_fused"]["timed_segments"]} == {"timed"}
    fused_dense_ms = got["dense_fused"]["step_kinds"]["dense"]["ms_per_call"]
    assert fused_dense_ms != got["dense"]["step_kinds"]["dense"]["ms_per_call"]
    dense_segs = [s for s in got["balanced"]["segments"] if s["kind"] == "dense"]
    assert dense_segs and {s["source"] for s in dense_segs} == {"dense row"}
    assert {s["ms_per_call"] for s in dense_segs} == {fused_dense_ms}
