"""dit_accel.pipelines: the preset table and its measured numbers, wrapping every family's pipeline, knobs,
compare, loading from a saved folder, and remove restoring stock output exactly (CPU, tiny pipelines)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _tiny_pipes import FAMILY, PIPELINES

import dit_accel
from dit_accel.methods import create_method, method_names
from dit_accel.methods.schedule import Schedule
from dit_accel.pipelines import presets, wrapped
from dit_accel.pipelines.quality import render_output
from dit_accel.processors import SUPPORTED

ROOT = Path(__file__).resolve().parents[1]
# Tiny sequences (12 to 700 tokens): 16-token blocks so that sparse plans have something to drop.
BLOCKS = {"block_q": 16, "block_k": 16}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads
    per process spin against each other (a 0.2 s render takes 3-10 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _processors(pipe) -> dict:
    return {
        (name, path): module.processor
        for name, tr in pipe.components.items()
        if name.startswith("transformer") and tr is not None
        for path, module in tr.named_modules()
        if hasattr(module, "processor")
    }


def _build(name):
    pipe, call = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


# ---------------------------------------------------------------- the table


def test_every_family_has_the_standard_presets_with_valid_knobs():
    assert set(presets.FAMILIES) == set(SUPPORTED.values())
    assert set(FAMILY.values()) == set(presets.FAMILIES)  # the tests below build every family
    for family in presets.FAMILIES:
        rows = presets.family_presets(family)
        assert [p.name for p in rows][: len(presets.PRESET_NAMES)] == list(presets.PRESET_NAMES)
        for p in rows:
            assert p.family == family and p.method in method_names()
            presets.check_knobs(p.method, p.knobs, family)  # radial never lands on an image family
        assert presets.get_preset(family, "dense").method == "dense"


def test_rows_without_a_measurement_say_untuned():
    for p in presets.table():
        if p.method == "dense":
            assert p.status == "reference" and p.tuned
        elif p.speed:
            assert p.status == "measured" and p.tuned
        else:
            assert p.status == f"untuned for {p.family}" and not p.tuned
            assert presets.speed_text(p) == "untuned"
    benchmarked = {"wan", "hunyuan_video", "flux", "sd3", "pixart", "qwenimage"}
    assert {p.family for p in presets.table() if p.speed} == benchmarked


def _embedded_blocks(method: str, knobs: dict) -> tuple[int, int]:
    """(block_q, block_k) of ``method`` with ``knobs`` at the embedded model's quality geometry (49 x 192 x
    256: a latent grid of 13 x 12 x 16 tokens, no text in self-attention)."""
    config = dit_accel.SparseAttentionConfig.from_knobs(method=method, **knobs)
    instance = create_method(config)
    config = instance.configure(config, (presets._family("wan"),))
    call = SimpleNamespace(config=config, q_len=2496, k_len=2496, grid=(13, 12, 16), text_len=0)
    return instance.blocks_for(call)


def _json_knobs(knobs: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}  # JSON has lists for tuples


def _same_schedule(measured: dict, preset: dict, steps: int) -> None:
    """Re-ttention knobs that name their refreshes differently (a period, fractions) run the same schedule
    at ``steps``: the refresh steps are equal, and so is everything else."""
    measured, preset = dict(measured), dict(preset)
    refreshes = []
    for knobs in (measured, preset):
        every, at = knobs.pop("refresh_every", None), knobs.pop("refresh_at", None)
        refreshes.append(
            Schedule(steps, warmup=knobs["dense_steps"], refresh_every=every, refresh_at=at).refresh_steps
        )
    assert refreshes[0] == refreshes[1] and measured == preset, (refreshes, measured, preset)


def _knobs_as_run(p, compiled: bool) -> dict:
    """The preset's knobs as a row of it ran: compiled blocks run the stock block forward, so a compiled
    row measured without ``fuse_blocks`` measured the preset with it."""
    return {k: v for k, v in p.knobs.items() if not (compiled and k == "fuse_blocks")}


def _same_preset_schedule(row: dict, p, steps: int) -> None:
    """A bench_e2e row run as ``preset=<name>`` (plus knobs of its own) ran today's preset: the row's method
    and warm-up, and the refresh steps of the schedule it verified, are the preset's (and its recorded knobs,
    where the run has them)."""
    assert row["resolved"]["method"] == p.method and row["resolved"]["dense_steps"] == p.knobs["dense_steps"]
    expected = _knobs_as_run(p, row["compiled"] is True)
    if "preset_knobs" in row:  # the method is compared above
        recorded = {k: v for k, v in row["preset_knobs"].items() if k != "method"}
        if row["compiled"] is True:
            recorded.pop("fuse_blocks", None)
        assert _json_knobs(recorded) == _json_knobs(expected)
    else:
        extra = {k: v for k, v in row["knobs"].items() if k != "preset"}
        assert all(expected.get(k) == v for k, v in extra.items()), (extra, expected)
    knobs = dict(p.knobs)
    every, at = knobs.get("refresh_every"), knobs.get("refresh_at")
    expected = Schedule(steps, warmup=knobs["dense_steps"], refresh_every=every, refresh_at=at).refresh_steps
    for kinds in row["schedule"].values():
        assert [i for i, kind in enumerate(kinds) if kind == "refresh"] == list(expected), (p.name, kinds)


def test_measured_numbers_are_read_back_from_their_sources():
    checked = 0
    for p in presets.table():
        for s in p.speed:
            assert round(s.measured(ROOT), 2) == s.speedup, (p.family, p.name, str(s.source))
            report = json.loads((ROOT / s.source.path).read_text())
            assert s.gpu in ("H100", "H200") and s.gpu in json.dumps(report["device"])
            if (
                p.method == "rettention" and report.get("benchmark") == "bench_e2e"
            ):  # run on the preset's schedule
                name = re.match(r"rows\[row=([^,\]]+)", s.source.key).group(1)
                compiled = "compiled=True" in s.source.key  # the row the number is of (a compiled-only run)
                (row,) = [
                    r for r in report["rows"] if r["row"] == name and (r["compiled"] is True) == compiled
                ]
                if row["knobs"].get("preset") == p.name:  # run as the preset: its verified schedule
                    _same_preset_schedule(row, p, report["steps"])
                else:
                    run = _json_knobs(row["knobs"])
                    # the preset's base
                    assert (run.pop("method"), run.pop("base")) == ("rettention", "window")
                    _same_schedule(run, _knobs_as_run(p, compiled), report["steps"])
            checked += 1
        if p.quality is None:
            continue
        q = p.quality
        report = json.loads((ROOT / q.path).read_text())
        (row,) = [r for r in report["rows"] if r["method"] == q.row]
        assert (round(row["psnr"], 2), round(row["ssim"], 3), round(row["density"], 3)) == (
            q.psnr,
            q.ssim,
            q.density,
        ), (p.family, p.name)
        assert (report["call"]["num_inference_steps"], row["prompts"]) == (q.steps, q.prompts)
        knobs = _json_knobs(row["knobs"])
        method = knobs.pop("method")
        # the measured run used the same method configuration, resolved as the embedded model (Wan) runs it
        assert method == p.method
        measured = presets.resolved_knobs(method, knobs, "wan")
        preset = presets.resolved_knobs(p.method, p.knobs, "wan")
        if method == "rettention":
            _same_schedule(measured, preset, q.steps)
        else:
            assert measured == preset
        assert _embedded_blocks(method, knobs) == _embedded_blocks(p.method, p.knobs), (p.family, p.name)
        if p.family != "wan":
            assert p.method != "radial"  # radial's knobs differ per family: Wan's quality does not carry over
        checked += 1
    assert checked >= 10


def test_docs_table_matches_the_code():
    doc = (ROOT / "docs/pipelines.md").read_text()
    assert presets.markdown_table() in doc
    assert presets.sources_text() in doc


def test_resolve_checks_names_before_any_model():
    with pytest.raises(ValueError, match="unknown preset 'turbo'.*'balanced'"):
        presets.resolve(None, "turbo")
    with pytest.raises(ValueError, match=r"not \['decay'\] \(those belong to 'radial'\)"):
        presets.resolve(None, "fast", {"decay": 0.2})  # re-ttention on Wan (the first family), else adaspa
    presets.resolve(None, "quality", {"decay": 0.2})  # radial for video families: checked once loaded
    with pytest.raises(ValueError, match="takes no knob 'decay'"):
        presets.resolve("flux", "quality", {"decay": 0.2})
    with pytest.raises(ValueError, match="sparsity"):
        presets.resolve(None, "fast", {"sparsity": 1.5})
    with pytest.raises(ValueError, match="refresh_every"):  # balanced is re-ttention on Wan and HunyuanVideo
        presets.resolve(None, "balanced", {"refresh_every": 0})
    with pytest.raises(ValueError, match="preset 'balanced' of wan is rettention: .*takes \\['density'"):
        presets.resolve("wan", "balanced", {"sparsity": 0.7})  # adaspa's knob; the window base's are named
    with pytest.raises(ValueError, match="unknown method 'sparse'"):
        presets.resolve("wan", None, {"method": "sparse"})
    with pytest.raises(ValueError, match="video method"):
        presets.resolve("sd3", None, {"method": "radial"})
    with pytest.raises(ValueError, match="preset 'fast' is method 'rettention'"):
        presets.resolve("wan", "fast", {"method": "window"})
    with pytest.raises(ValueError, match="preset 'fast' is method 'adaspa' or 'rettention'"):
        presets.resolve(None, "fast", {"method": "window"})
    s = presets.resolve("wan", None, {})
    assert (s.preset, s.method, dict(s.knobs)) == (
        "balanced",
        "rettention",
        {"density": 0.05, "dense_steps": 0.1, "refresh_at": (0.2, 0.4, 0.6, 0.8), "fuse_blocks": True},
    )
    assert presets.resolve("flux", None, {}).method == "adaspa"  # untuned families keep adaspa


# ---------------------------------------------------------------- every family


@pytest.mark.parametrize("name", list(PIPELINES))
def test_family_presets_compare_and_remove(name):
    """Wrap a tiny pipeline of the family: the dense preset renders the stock output bit for bit, every
    preset applies its method, compare returns both renders with finite metrics, remove restores stock."""
    pipe, call = _build(name)
    fresh, _ = _build(name)
    stock = render_output(fresh, **call)
    stock_processors = _processors(pipe)

    accel = dit_accel.pipelines.wrap(pipe, preset="dense")
    assert accel.family == FAMILY[name] and accel.kind == presets.FAMILIES[accel.family]
    assert np.array_equal(render_output(accel, **call), stock)
    assert {r["kind"] for r in accel.stats().records} == {"dense"}

    for preset in ("quality", "balanced", "fast"):
        accel.configure(preset=preset, **BLOCKS)
        row = presets.get_preset(accel.family, preset)
        assert accel.handle.method.name == row.method and accel.preset == preset
        assert accel.knobs == {**row.knobs, **BLOCKS}
        out = accel(**call, output_type="latent", generator=torch.Generator().manual_seed(0))
        latents = out.frames if accel.kind == "video" else out.images
        assert torch.isfinite(latents).all() and accel.stats().records

    result = accel.compare(seed=0, **call)  # the fast preset
    assert np.array_equal(result.dense, stock)  # the reference is stock attention
    assert result.accelerated.shape == stock.shape
    n = len(result.psnr)
    assert n == len(result.ssim) == (stock.shape[0] * stock.shape[1] if accel.kind == "video" else len(stock))
    if result.density < 1:
        assert not np.array_equal(result.accelerated, stock)
        assert all(math.isfinite(v) for v in result.psnr + result.ssim)
        assert math.isfinite(result.psnr_mean) and 0 < result.ssim_mean <= 1
    else:  # every plan kept every block: on the CPU that runs the dense kernel stock runs
        assert np.array_equal(result.accelerated, stock) and result.psnr_mean == math.inf
    assert result.seconds > 0 and result.seconds_dense > 0 and math.isfinite(result.speedup)
    assert result.sparse_calls > 0 and 0 < result.density <= 1 and result.calls == len(result.stats.records)
    assert accel.stats().records == result.stats.records  # still installed, showing the accelerated render
    assert result.side_by_side().shape[2] == 2 * stock.shape[-2] + 4

    restored = accel.remove()
    assert restored is pipe and dit_accel.api.get_handle(pipe) is None
    assert _processors(pipe) == stock_processors  # the very same processor objects
    assert np.array_equal(render_output(pipe, **call), stock)
    with pytest.raises(RuntimeError, match="removed"):
        accel(**call)


def test_wan22_experts_share_the_preset():
    pipe, call = _build("wan22")
    accel = dit_accel.pipelines.wrap(pipe, preset="balanced", **BLOCKS)
    assert set(accel.handle.transformers) == {"transformer", "transformer_2"}
    render_output(accel, **{**call, "num_inference_steps": 6})
    components = {r["component"] for r in accel.stats().records}
    assert components == {"transformer", "transformer_2"}


# ---------------------------------------------------------------- knobs


def test_knobs_override_the_preset_and_change_between_calls():
    pipe, call = _build("wan")
    accel = dit_accel.pipelines.wrap(pipe, preset="balanced", refresh_every=4, **BLOCKS)
    assert accel.handle.method.correction.refresh_every == 4 and accel.preset == "balanced"
    first = accel.handle
    accel.configure(density=0.1)  # keeps the preset and the earlier overrides
    assert accel.handle is not first and accel.handle.method.correction.refresh_every == 4
    assert accel.handle.method.pattern.density == 0.1
    assert accel.handle.config.block_q == 16 and dit_accel.api.get_handle(pipe) is accel.handle
    assert first._removed  # replaced, never stacked
    accel.configure(refresh_at=(0.3,))  # replaces the override's refresh_every, the other way to say it
    assert accel.knobs["refresh_at"] == (0.3,) and "refresh_every" not in accel.knobs
    assert accel.handle.method.correction.refresh_every is None
    assert "refresh_every" not in dit_accel.pipelines.wrap(pipe, preset="balanced", refresh_at=(0.5,)).knobs
    accel.configure(preset="fast")  # starts over from the preset
    assert accel.knobs == {"density": 0.05, "dense_steps": 0.1, "refresh_at": (0.3,), "fuse_blocks": True}
    assert accel.handle.config.block_q == dit_accel.SparseAttentionConfig().block_q  # the override is gone
    accel.configure(method="window", density=0.3, **BLOCKS)
    assert (accel.preset, accel.method, accel.handle.method.density) == (None, "window", 0.3)
    render_output(accel, **call)
    assert {r["kind"] for r in accel.stats().records} == {"sparse"}
    other = dit_accel.pipelines.wrap(accel, preset="dense")  # wraps the pipeline, replacing the installation
    assert other.pipe is pipe and dit_accel.api.get_handle(pipe) is other.handle
    render_output(accel, **call)  # the wrapper called is the one that runs: window is installed again
    assert dit_accel.api.get_handle(pipe) is accel.handle and accel.handle.method.name == "window"


def test_knob_errors_name_the_methods_knobs_and_change_nothing():
    pipe, _ = _build("flux")
    with pytest.raises(ValueError, match=r"'adaspa' takes no knob 'decay'; its knobs: \['sparsity', 'tau'"):
        dit_accel.pipelines.wrap(pipe, preset="fast", decay=0.2)
    with pytest.raises(ValueError, match="no preset 'turbo' for flux; its presets: \\['dense', 'quality'"):
        dit_accel.pipelines.wrap(pipe, preset="turbo")
    with pytest.raises(ValueError, match="radial attention is a video method"):
        dit_accel.pipelines.wrap(pipe, method="radial")
    assert dit_accel.api.get_handle(pipe) is None
    accel = dit_accel.pipelines.wrap(pipe, preset="balanced")
    handle = accel.handle
    with pytest.raises(ValueError, match="window density"):
        accel.configure(method="window", density=2.0)
    with pytest.raises(ValueError, match="takes no knob 'density'"):
        accel.configure(density=0.2)
    assert accel.handle is handle and accel.method == "adaspa" and dit_accel.api.get_handle(pipe) is handle
    assert accel.configure(tau=0.9).knobs == {"tau": 0.9}, "tau replaces the preset's sparsity"


def test_unsupported_pipelines_name_what_is_supported(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 4),
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(
        ValueError, match="no transformer component.*WanTransformer3DModel.*FluxTransformer2DModel"
    ):
        dit_accel.pipelines.wrap(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))

    class OtherPipeline(DiffusionPipeline):
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

    with pytest.raises(ValueError, match=r"transformer is a Linear\. .*qwenimage \(image"):
        dit_accel.pipelines.wrap(OtherPipeline(torch.nn.Linear(2, 2)))

    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "SanaPipeline", "transformer": ["diffusers", "SanaTransformer2DModel"]})
    )
    with pytest.raises(ValueError, match="SanaTransformer2DModel.*supported: wan"):
        wrapped.family_of_source(tmp_path)
    with pytest.raises(ValueError, match="no pipeline folder"):
        wrapped.family_of_source(tmp_path / "missing")
    assert wrapped.family_of_source("org/model-name") is None  # a hub id: known once loaded


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_from_pretrained_loads_a_saved_folder(name, tmp_path, monkeypatch):
    pipe, call = _build(name)
    reference = render_output(dit_accel.pipelines.wrap(pipe, preset="fast", **BLOCKS), **call)
    dit_accel.remove(pipe)
    pipe.save_pretrained(tmp_path)
    assert wrapped.family_of_source(tmp_path) == FAMILY[name]
    no_text = {k: None for k in pipe.components if k.startswith(("text_encoder", "tokenizer"))}
    accel = dit_accel.pipelines.from_pretrained(
        tmp_path, "fast", torch_dtype=torch.float32, load_kwargs=no_text, **BLOCKS
    )
    assert type(accel.pipe) is type(pipe) and accel.family == FAMILY[name]
    assert (accel.preset, accel.method) == ("fast", {"wan": "rettention", "flux": "adaspa"}[name])
    accel.set_progress_bar_config(disable=True)  # the pipeline's own methods pass through
    out = render_output(accel, **call)
    np.testing.assert_allclose(out, reference, atol=1e-5)  # the saved scheduler config rounds at 1e-7

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before checking the preset")

    monkeypatch.setattr(wrapped, "load_pipeline", no_loading)
    with pytest.raises(ValueError, match="no preset 'turbo'"):
        dit_accel.pipelines.from_pretrained(tmp_path, "turbo")
    if name == "flux":
        with pytest.raises(ValueError, match="video method"):
            dit_accel.pipelines.from_pretrained(tmp_path, method="radial")


def test_from_pretrained_embedded_is_the_wan_family(tmp_path):
    from dit_accel.pipelines.tiny_video import model

    model.save_weights(tmp_path, model.build_components(model.SMOKE_CONFIG), model.SMOKE_CONFIG)
    accel = dit_accel.pipelines.from_pretrained(tmp_path, "quality", **BLOCKS)
    assert accel.family == "wan" and accel.method == "radial"
    assert accel.handle.method.decay == 0.2  # radial's Wan defaults
    accel.set_progress_bar_config(disable=True)
    frames = accel(prompt="a red circle", num_frames=5, height=32, width=32, num_inference_steps=2).frames
    assert frames.shape == (1, 5, 32, 32, 3)
    assert wrapped.source_kind("embedded") == ("embedded", None)
