"""The ``dit-accel`` command: render (embedded model, saved pipeline folders of a video and an image family,
presets, --compare), presets, and every argument checked before a model is loaded (CPU)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from _tiny_pipes import flux_with_text, wan_with_text

from dit_accel import cli
from dit_accel.pipelines import presets, wrapped
from dit_accel.pipelines.tiny_video import model

SMALL = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "3", "--device", "cpu"]
BLOCKS = ["--opt", "block_q=16", "--opt", "block_k=16"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads
    per process spin against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke_weights(tmp_path_factory):
    """The embedded model's CPU-sized configuration, untrained, saved as the loader reads it."""
    out = tmp_path_factory.mktemp("smoke")
    model.save_weights(out, model.build_components(model.SMOKE_CONFIG), model.SMOKE_CONFIG)
    return out


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("wan_pipeline")
    wan_with_text().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("flux_pipeline")
    flux_with_text().save_pretrained(out)
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the command loads a model."""

    def load(*args, **kwargs):
        raise AssertionError("the command loaded a model before rejecting its arguments")

    monkeypatch.setattr(wrapped, "load_pipeline", load)


def _render(*args):
    return cli.main(["render", "--prompt", "a red circle moving left", *args])


# ---------------------------------------------------------------- parsing


def test_parses_render_flags():
    args = cli.build_parser().parse_args(
        [
            "render",
            "--prompt",
            "a red circle moving left",
            "--out",
            "x.gif",
            "--method",
            "window",
            "--opt",
            "density=0.25",
            "--opt",
            "block_q=64",
            "--dense-steps",
            "2",
            "--steps",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert (args.command, args.method, args.steps, args.device, args.frames, args.model) == (
        "render",
        "window",
        4,
        "cpu",
        None,
        "embedded",
    )
    assert cli._knobs(args) == {"method": "window", "density": 0.25, "block_q": 64, "dense_steps": 2}
    args = cli.build_parser().parse_args(["render", "--prompt", "p", "--out", "o", "--preset", "fast"])
    assert cli._knobs(args) == {}
    args = cli.build_parser().parse_args(["render", "--prompt", "p", "--out", "o", "--dense-steps", "0.25"])
    with pytest.raises(cli.UsageError, match="--dense-steps: needs --method or --preset"):
        cli._knobs(args)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["render", "--out", "x.gif"])
    with pytest.raises(cli.UsageError, match="cannot write '.avi'"):
        cli.check_output("clip.avi")


# ---------------------------------------------------------------- rendering


def test_without_weights_says_how_to_train(tmp_path, capsys):
    rc = _render("--out", str(tmp_path / "x.gif"), "--weights", str(tmp_path / "none"), "--device", "cpu")
    assert rc == 2
    assert model.TRAIN_COMMAND in capsys.readouterr().err
    assert not (tmp_path / "x.gif").exists()


@pytest.mark.parametrize("out", ["clip.gif", "frames", "clip.mp4"])
def test_renders_the_embedded_model_with_a_method(smoke_weights, tmp_path, capsys, out):
    if out.endswith(".mp4"):
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            with pytest.raises(cli.UsageError, match=r"dit-accel\[video\]"):
                cli.check_output(str(tmp_path / out))
            return
    rc = _render(
        "--out",
        str(tmp_path / out),
        "--weights",
        str(smoke_weights),
        *SMALL,
        "--method",
        "window",
        "--opt",
        "density=0.5",
        *BLOCKS,
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "dit_accel[window]" in text
    path = tmp_path / out
    if out == "frames":
        assert sorted(p.name for p in path.iterdir()) == [f"frame_{i:04d}.png" for i in range(5)]
    else:
        assert path.stat().st_size > 0
    if out.endswith(".gif"):
        from PIL import Image

        assert Image.open(path).n_frames == 5


@pytest.fixture
def aot_compile(monkeypatch):
    """``--compile`` through the aot_eager backend (no C++ compiler on the CPU); the compiled blocks."""
    real, compiled = wrapped.compile_blocks, []

    def compile_blocks(pipe, **kwargs):
        compiled.extend(pipe.transformer.blocks)
        return real(pipe, backend="aot_eager", **kwargs)

    monkeypatch.setattr(wrapped, "compile_blocks", compile_blocks)
    torch._dynamo.reset()
    yield compiled
    torch._dynamo.reset()


def test_compile_flag_compiles_the_blocks_before_rendering(smoke_weights, tmp_path, capsys, aot_compile):
    args = ["--weights", str(smoke_weights), *SMALL, "--preset", "balanced", *BLOCKS]
    assert _render("--out", str(tmp_path / "eager.gif"), *args) == 0
    assert not aot_compile
    assert _render("--out", str(tmp_path / "compiled.gif"), *args, "--compile") == 0
    text = capsys.readouterr().out
    assert f"torch.compile on {len(aot_compile)} transformer blocks" in text and aot_compile
    assert all(b._compiled_call_impl is not None for b in aot_compile)
    from PIL import Image

    eager, compiled = (
        np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=float)
        for name in ("eager.gif", "compiled.gif")
    )
    assert np.abs(eager - compiled).mean() < 2  # GIF-quantised pixels: the same clip


def test_readme_command_renders_the_packaged_model(tmp_path, capsys):
    """The README's render command with the default model (the committed weights), made short."""
    rc = _render("--out", str(tmp_path / "clip.gif"), *SMALL)
    assert rc == 0 and (tmp_path / "clip.gif").stat().st_size > 0
    assert "5 frames 32x32, 3 steps on cpu" in capsys.readouterr().out


def test_compare_writes_both_and_prints_the_numbers(smoke_weights, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    rc = _render(
        "--out", str(out), "--weights", str(smoke_weights), *SMALL, "--preset", "fast", "--compare", *BLOCKS
    )
    assert rc == 0
    text = capsys.readouterr().out
    from PIL import Image

    side = Image.open(tmp_path / "clip_compare.gif")
    assert Image.open(out).size == (32, 32) and side.size == (68, 32) and side.n_frames == 5
    # PSNR is inf where every plan keeps every block (the CPU path then runs the dense kernel stock runs)
    assert re.search(r"preset 'fast': rettention .* vs dense: PSNR ([\d.]+|inf) dB .* SSIM [\d.]+", text)
    assert re.search(r"speedup [\d.]+x; density [\d.]+ over \d+ sparse", text)


def test_renders_a_saved_video_pipeline(wan_folder, tmp_path, capsys):
    rc = _render(
        "--model", str(wan_folder), "--out", str(tmp_path / "frames"), *SMALL, "--preset", "balanced", *BLOCKS
    )
    assert rc == 0
    assert len(list((tmp_path / "frames").iterdir())) == 5
    text = capsys.readouterr().out
    assert "5 frames 32x32, 3 steps" in text and "dit_accel[rettention]" in text  # balanced on Wan


def test_renders_a_saved_image_pipeline_as_png(flux_folder, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "image.png"
    args = ["--model", str(flux_folder), "--out", str(out), "--height", "32", "--width", "32", "--steps", "3"]
    assert _render(*args, "--preset", "quality", "--compare", *BLOCKS) == 0
    assert Image.open(out).size == (32, 32)
    assert Image.open(tmp_path / "image_compare.png").size == (68, 32)
    text = capsys.readouterr().out
    assert "1 image 32x32" in text and "preset 'quality': adaspa (sparsity=0.6" in text
    assert _render(*args, "--out", str(tmp_path / "stock")) == 0  # stock attention, a folder of PNGs
    assert [p.name for p in (tmp_path / "stock").iterdir()] == ["image_0000.png"]
    stock = np.asarray(Image.open(tmp_path / "stock" / "image_0000.png"))
    assert stock.shape == (32, 32, 3)


def test_presets_lists_every_family_with_its_numbers(capsys):
    assert cli.main(["presets"]) == 0
    text = capsys.readouterr().out
    for family in presets.FAMILIES:
        assert f"{family} ({presets.FAMILIES[family]})" in text
    quality = presets.get_preset("wan", "quality")
    speed, q = quality.speed[0], quality.quality
    assert f"{speed.speedup:.2f}x {speed.geometry}" in text and f"{q.psnr:.2f} dB / {q.ssim:.3f}" in text
    assert "[untuned for mochi]" in text
    assert re.search(
        r"^  balanced +rettention +density=\S+, .*fuse_blocks=True +\[measured\]$", text, re.M
    )  # own columns
    assert cli.main(["presets", "--family", "wan", "--markdown"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(presets.markdown_table("wan")) and presets.sources_text("wan") in text


# ---------------------------------------------------------------- arguments checked before loading

BAD = [
    (["--frames", "0"], "--frames", "positive number of frames, got 0"),
    (["--frames", "-5"], "--frames", "positive number of frames, got -5"),
    (["--frames", "16"], "--frames", "4k + 1 frames (e.g. 13 or 17), got 16"),
    (["--steps", "0"], "--steps", "positive number of denoising steps, got 0"),
    (["--steps", "-1"], "--steps", "positive number of denoising steps, got -1"),
    (["--fps", "0"], "--fps", "positive frame rate, got 0"),
    (["--height", "100"], "--height", "positive multiple of 16, got 100"),
    (["--width", "-16"], "--width", "positive multiple of 16, got -16"),
    (["--method", "sparse"], "--method", "invalid choice: 'sparse'"),
    (["--preset", "turbo"], "--preset", "invalid choice: 'turbo'"),
    (["--method", "window", "--opt", "density=2"], "--opt", "density must lie in (0, 1], got 2"),
    (["--method", "window", "--opt", "density"], "--opt", "expected KEY=VALUE, got 'density'"),
    (["--method", "window", "--opt", "decay=0.2"], "--opt", "takes no knob 'decay'; its knobs: ['density'"),
    (
        ["--preset", "fast", "--opt", "sparsity=0.8"],
        "--opt",
        "takes ['density', 'per_frame'], not ['sparsity']",
    ),
    (["--preset", "fast", "--method", "window"], "--preset", "preset 'fast' is method 'rettention'"),
    (["--opt", "density=0.1"], "--opt", "needs --method or --preset"),
    (["--method", "window", "--dense-steps", "-1"], "--dense-steps", "got -1.0"),
    (["--out", "clip.avi"], "--out", "cannot write '.avi' files: use .mp4"),
    (["--out", "clip.png"], "--out", "a video pipeline cannot write '.png'"),
    (["--weights", "w", "--model", "org/name"], "--weights", "is for the embedded model"),
    (["--model", "./missing_folder"], "--model", "no pipeline folder at ./missing_folder"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "--device", "sees no CUDA device; use --device cpu"))


@pytest.mark.parametrize(
    ("args", "argument", "message"), BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_arguments_fail_before_loading(
    args, argument, message, tmp_path, capsys, no_loading, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = [] if "--out" in args else ["--out", "clip.gif"]
    with pytest.raises(SystemExit) as exc:
        _render(*out, *args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argument}" in err and message in err, err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_unwritable_out_fails_before_loading(tmp_path, capsys, no_loading):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exc:
        _render("--out", str(tmp_path / "a_file" / "clip.gif"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out: cannot create" in err and "a_file is not a folder" in err
    (tmp_path / "frames").write_text("")
    with pytest.raises(SystemExit) as exc:
        _render("--out", str(tmp_path / "frames"))
    assert exc.value.code == 2
    assert "frames exists and is not a folder" in capsys.readouterr().err
    (tmp_path / "frames").unlink()
    (tmp_path / "frames_compare").write_text("")
    with pytest.raises(SystemExit):
        _render("--out", str(tmp_path / "frames"), "--preset", "fast", "--compare")
    assert "frames_compare exists and is not a folder" in capsys.readouterr().err


def test_model_checks_before_loading(tmp_path, flux_folder, capsys, no_loading):
    (tmp_path / "model_index.json").write_text('{"_class_name": "X", "unet": ["diffusers", "UNet2DModel"]}')
    with pytest.raises(SystemExit):
        _render("--model", str(tmp_path), "--out", str(tmp_path / "x.png"))
    err = capsys.readouterr().err
    assert "argument --model" in err and "no transformer component" in err and "FluxTransformer2DModel" in err
    for args, message in [
        (["--out", str(tmp_path / "x.gif")], "an image pipeline cannot write '.gif'"),
        (["--out", str(tmp_path / "x.png"), "--frames", "5"], "flux is an image family; it draws no frames"),
        (["--out", str(tmp_path / "x.png"), "--method", "radial"], "radial attention is a video method"),
        (["--out", str(tmp_path / "x.png"), "--height", "20"], "positive multiple of 8, got 20"),
    ]:
        with pytest.raises(SystemExit):
            _render("--model", str(flux_folder), *args)
        assert message in capsys.readouterr().err


def test_hub_ids_go_to_diffusers_and_are_checked_once_loaded(tmp_path, capsys, monkeypatch):
    from diffusers import DiffusionPipeline

    loaded = []

    def from_pretrained(name, **kwargs):
        loaded.append((name, kwargs))
        if name == "org/missing":
            raise OSError("org/missing is not a local folder and not on the hub")
        return flux_with_text()

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", from_pretrained)
    assert _render("--model", "org/missing", "--out", str(tmp_path / "x.png"), "--device", "cpu") == 1
    assert "cannot load org/missing: org/missing is not a local folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _render("--model", "org/flux", "--out", str(tmp_path / "x.gif"), "--device", "cpu")
    assert exc.value.code == 2 and "an image pipeline cannot write '.gif'" in capsys.readouterr().err
    args = ["--model", "org/flux", "--out", str(tmp_path / "x.png"), "--height", "32", "--width", "32"]
    assert _render(*args, "--steps", "2", "--device", "cpu", "--dtype", "float32") == 0
    assert (tmp_path / "x.png").is_file()
    assert loaded[-1] == ("org/flux", {"dtype": torch.float32})


# ------------------------------------------------------------------------------------------------ bench


def _bench(*args):
    return cli.main(["bench", *args])


def test_bench_times_stock_and_each_configuration_and_writes_json(smoke_weights, tmp_path, capsys):
    import json

    out = tmp_path / "bench.json"
    rc = _bench(
        "--weights", str(smoke_weights), *SMALL, "--warmup", "0", "--repeats", "1",
        "--configs", "fast,window:density=0.5,block_q=16,block_k=16", "--out", str(out),
    )  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["stock", "fast", "window:density=0.5,block_q=16,block_k=16"]
    stock = report["rows"][0]
    assert report["family"] == "wan" and report["call"]["num_inference_steps"] == 3
    for row in report["rows"][1:]:
        assert row["error"] is None and len(row["all_seconds"]) == 1
        assert row["speedup"] == pytest.approx(stock["seconds"] / row["seconds"])
        assert 0 < row["density"] <= 1 and row["psnr_mean"] > 0 and row["ssim_mean"] <= 1
    assert report["rows"][2]["settings"].startswith("window (density=0.5")
    text = capsys.readouterr().out
    assert "| fast | preset 'fast': rettention" in text and "say nothing about speed on a GPU" in text


def test_bench_default_configs_are_the_family_presets_but_dense():
    args = cli.build_parser().parse_args(["bench"])
    assert cli._bench_configs(args, "wan") == ["quality", "balanced", "fast"]
    assert cli._bench_configs(args, "flux") == ["quality", "balanced", "fast"]


def test_bench_splits_configs_at_commas_that_start_one():
    split = cli._split_configs("balanced,window:density=0.25,block_q=64,rettention:base=radial,fast")
    assert split == ["balanced", "window:density=0.25,block_q=64", "rettention:base=radial", "fast"]


@pytest.mark.parametrize(
    ("args", "argument", "message"),
    [
        (["--configs", "turbo"], "--configs", "'turbo'"),
        (["--configs", "window:density=2"], "--configs", "density must lie in (0, 1], got 2"),
        (["--configs", "balanced,,fast"], "--configs", "expected comma-separated presets"),
        (["--repeats", "0"], "--repeats", "must be >= 1, got 0"),
        (["--warmup", "-1"], "--warmup", "must be >= 0, got -1"),
        (["--height", "100"], "--height", "positive multiple of 16, got 100"),
        (["--model", "./missing_folder"], "--model", "no pipeline folder at ./missing_folder"),
    ],
)
def test_bench_bad_arguments_fail_before_loading(
    args, argument, message, tmp_path, capsys, no_loading, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        _bench(*args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argument}" in err and message in err, err


def _bench_with(smoke_weights, out, config: str, flag: str) -> tuple[int, dict, dict]:
    """``dit-accel bench`` of stock and ``config`` with ``flag``: exit code, report, accelerated row."""
    rc = _bench(
        "--weights", str(smoke_weights), *SMALL, "--warmup", "0", "--configs", config, "--out", str(out), flag
    )  # fmt: skip
    report = json.loads(out.read_text())
    return rc, report, report["rows"][1]


def test_cuda_graphs_flag(smoke_weights, tmp_path, capsys):
    """``--cuda-graphs`` sets the knob of the accelerated render (on the CPU its forwards run eagerly, and the
    stats line says so); without a method or preset there is nothing to replay."""
    with pytest.raises(SystemExit):
        _render("--out", str(tmp_path / "stock.gif"), *SMALL, "--cuda-graphs")
    assert "argument --cuda-graphs: replays dit_accel's forwards" in capsys.readouterr().err
    args = ["--weights", str(smoke_weights), *SMALL, "--method", "dense", "--cuda-graphs"]
    assert _render("--out", str(tmp_path / "dense.gif"), *args) == 0
    assert "forwards: 0 replayed, 0 captured, 6 eager" in capsys.readouterr().out  # 3 steps x cond, uncond
    rc, report, row = _bench_with(smoke_weights, tmp_path / "bench.json", "dense", "--cuda-graphs")
    assert rc == 0 and report["cuda_graphs"] is True
    assert "cuda_graphs=True" in row["settings"] and row["error"] is None


def test_fuse_blocks_flag(smoke_weights, tmp_path, capsys):
    """``--fuse-blocks`` sets the knob of the accelerated render (on the CPU the block steps run the eager
    arithmetic); it needs a method or preset."""
    with pytest.raises(SystemExit):
        _render("--out", str(tmp_path / "stock.gif"), *SMALL, "--fuse-blocks")
    assert "argument --fuse-blocks: is a dit_accel knob" in capsys.readouterr().err
    rc, report, row = _bench_with(smoke_weights, tmp_path / "bench.json", "dense", "--fuse-blocks")
    assert rc == 0 and report["fuse_blocks"] is True
    assert "fuse_blocks=True" in row["settings"] and row["error"] is None
    # --no-fuse-blocks: off where a preset turns it on (Wan's sparse presets do)
    rc, report, row = _bench_with(smoke_weights, tmp_path / "bench.json", "balanced", "--no-fuse-blocks")
    assert rc == 0 and report["fuse_blocks"] is False
    assert "fuse_blocks=False" in row["settings"] and row["error"] is None
