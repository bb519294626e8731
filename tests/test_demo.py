"""The Gradio demo through its API (``gradio_client`` against a served app, CPU, the embedded model at a small
geometry): generate, compare, bad requests that leave the app serving, a local pipeline folder, cancelling;
plus the request checks, the pictures and the ``dit-accel demo`` arguments without a server.

Without gradio these tests skip locally and fail in CI (``CI`` set, as .ci/run does).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        message = f'{module} is not installed: pip install "dit-accel[demo]" (the demo tests need it)'
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)


_need("gradio")
_need("gradio_client")
_need("imageio_ffmpeg")

import imageio_ffmpeg  # noqa: E402
from gradio_client import Client  # noqa: E402

from dit_accel import cli  # noqa: E402
from dit_accel.demo import app as demo_app  # noqa: E402
from dit_accel.demo import pictures, requests  # noqa: E402
from dit_accel.demo.engine import Cancelled, Engine  # noqa: E402
from dit_accel.pipelines.tiny_video.data import parse_caption  # noqa: E402

SMALL = {"frames": 9, "height": 64, "width": 64, "steps": 4}
PROMPT = demo_app.EXAMPLE_PROMPTS[0]
OK = ("**Generated**:", "**Compared with dense**:")  # how a finished job's status starts


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _is_local(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def outside_connections():
    """Every connection or name lookup to a host other than this machine while the module runs."""
    seen: list[str] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def checked_connect(self, address):
        if isinstance(address, tuple) and not _is_local(str(address[0])):
            seen.append(f"connect {address}")
        return connect(self, address)

    def checked_getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_local(host.decode() if isinstance(host, bytes) else str(host)):
            seen.append(f"lookup {host}")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = checked_connect, checked_getaddrinfo
    yield seen
    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo


@pytest.fixture(scope="module")
def served(outside_connections, tmp_path_factory):
    """The app on a free port and a client. The client is gradio_client, which asks the Hugging Face Hub for
    an agent registry and sends telemetry unless huggingface_hub is offline: the test's client is put
    offline so that what is left to watch is the app."""
    import huggingface_hub.constants

    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    torch.set_num_threads(1)
    engine = Engine(device="cpu", out_dir=tmp_path_factory.mktemp("demo_out"))
    blocks, url = demo_app.launch(engine, port=_free_port(), defaults=SMALL, block=False, quiet=True)
    client = Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    yield engine, client, url
    client.close()
    blocks.close()
    huggingface_hub.constants.HF_HUB_OFFLINE = offline


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fields(**overrides) -> dict:
    fields = {
        "prompt": PROMPT,
        "model": "embedded",
        "preset": "balanced",
        "method": requests.PRESET_METHOD,
        "base": requests.DEFAULT_BASE,
        "sparsity": None,
        "density": None,
        "dense_steps": None,
        "refresh_every": None,
        "more_knobs": "",
        "seed": 0,
        **SMALL,
    }
    fields.update(overrides)
    return fields


def _call(client: Client, api: str, **overrides):
    out = client.predict(**_fields(**overrides), api_name=f"/{api}")
    keys = ("status", "dense", "video", "numbers", "pattern", "density", "layer", "head", "step")
    return dict(zip(keys, out))


def _video_path(value) -> str | None:
    if value is None:
        return None
    return value["video"] if isinstance(value, dict) else value


def _check_h264(path: str, frames: int, height: int, width: int) -> None:
    reader = imageio_ffmpeg.read_frames(path)
    meta = next(reader)
    count = sum(1 for _ in reader)
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p"), meta
    assert meta["size"] == (width, height)
    assert count == frames


def _number(text: str, label: str) -> str:
    row = next((line for line in text.splitlines() if line.startswith(f"| {label} ")), None)
    assert row is not None, f"no {label!r} row in:\n{text}"
    return row


# -------------------------------------------------------------------------------------------- through the API


def test_generate(served):
    _, client, _ = served
    # adaspa skips blocks at this 48-token size; the Wan presets' window (re-ttention) keeps all 3 of a row
    out = _call(client, "generate", preset="fast", method="adaspa", sparsity=0.9)  # replaces the preset
    assert out["status"].startswith(OK), out["status"]
    assert "; adaspa (sparsity=0.9)" in out["status"] and "preset fast" not in out["status"], out["status"]
    assert _video_path(out["dense"]) is None
    _check_h264(_video_path(out["video"]), **{k: SMALL[k] for k in ("frames", "height", "width")})
    assert re.search(r"\| wall time \| \d+\.\d\d s \|", out["numbers"]), out["numbers"]
    computed = _number(out["numbers"], "computed")
    density = float(re.search(r"(\d+\.\d)% of blocks", computed).group(1))
    assert 0 < density < 100, computed  # adaspa at 0.9 sparsity skips blocks after its warm-up
    from PIL import Image

    for key in ("pattern", "density"):
        with Image.open(out[key]) as img:
            assert img.format == "PNG" and img.width >= 400, (key, img.format, img.size)
    maxima = tuple(out[k]["maximum"] for k in ("layer", "head", "step"))
    assert maxima == (5, 5, SMALL["steps"] - 1)  # 6 layers, 6 heads, 4 steps
    assert (out["layer"]["value"], out["step"]["value"]) == (3, SMALL["steps"] - 1)  # middle layer, last step


def test_compare_dense_preset_is_identical(served):
    """The dense preset against stock attention: the same frames, every block computed."""
    _, client, _ = served
    out = _call(client, "compare", preset="dense")
    assert out["status"].startswith(OK), out["status"]
    assert "identical (∞ dB)" in _number(out["numbers"], "PSNR vs dense")
    assert "1.0000" in _number(out["numbers"], "SSIM vs dense")
    assert "every block" in _number(out["numbers"], "computed")


def test_compare(served):
    _, client, _ = served
    out = _call(client, "compare", method="adaspa", sparsity=0.9)  # skips blocks at this size (test_generate)
    assert out["status"].startswith(OK) and "Compared with dense" in out["status"], out["status"]
    for key in ("dense", "video"):
        _check_h264(_video_path(out[key]), **{k: SMALL[k] for k in ("frames", "height", "width")})
    numbers = out["numbers"]
    times = re.search(r"\| wall time \| (\d+\.\d\d) s \| (\d+\.\d\d) s \|", numbers)
    speedup = re.search(r"\*\*(\d+\.\d\d)×\*\*", _number(numbers, "speedup"))
    psnr = re.search(r"(\d+\.\d\d) dB", _number(numbers, "PSNR vs dense"))
    ssim = re.search(r"\| (-?\d\.\d{4}) \|", _number(numbers, "SSIM vs dense"))
    assert times and speedup and psnr and ssim, numbers
    dense_s, accel_s = map(float, times.groups())
    assert float(speedup.group(1)) == pytest.approx(dense_s / accel_s, rel=0.03)  # of times rounded to 10 ms
    assert 5 < float(psnr.group(1)) < 100  # sparse attention changes the clip, but not into noise
    assert "sparse" in _number(numbers, "computed")


def test_bad_requests_get_messages_and_the_app_keeps_serving(served):
    _, client, _ = served
    bad = [
        ({"frames": 6}, "4k + 1 frames"),
        ({"height": 72}, "multiple of 16"),
        ({"prompt": "   "}, "Type a prompt"),
        ({"more_knobs": "decay=0.2"}, "not ['decay'] (those belong to 'radial')"),  # balanced: re-ttention
        ({"preset": "quality", "base": "window"}, "takes no knob 'base'"),  # radial
        ({"more_knobs": "save_patterns='/tmp/x'"}, "cannot be set here"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"dense_steps": 2.5}, "dense steps"),
        ({"frames": 4001, "height": 4096, "width": 4096}, "will not fit in memory"),
        ({"model": "/nonexistent/pipeline"}, "no pipeline folder"),
        ({"model": "some-org/some-model"}, "never from the network"),
    ]
    for fields, expected in bad:
        out = _call(client, "generate", **fields)
        assert out["status"].startswith(demo_app.ERROR_PREFIX), (fields, out["status"])
        assert expected in out["status"], (fields, out["status"])
        assert "Traceback" not in out["status"]
    out = _call(client, "compare", preset="quality")
    assert out["status"].startswith(OK), out["status"]


def test_no_connection_off_this_machine(served, outside_connections):
    _, client, _ = served
    assert _call(client, "generate", preset="quality")["status"].startswith(OK)
    assert outside_connections == []


def test_local_pipeline_folder_and_image_families(served, tmp_path):
    """A pipeline folder written by save_pretrained renders; an image family's folder gets a message."""
    from _tiny_pipes import wan_with_text

    _, client, _ = served
    folder = tmp_path / "wan"
    wan_with_text().save_pretrained(folder)
    out = _call(client, "generate", model=str(folder), frames=5, height=32, width=32, steps=2)
    assert out["status"].startswith(OK), out["status"]
    _check_h264(_video_path(out["video"]), 5, 32, 32)
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
    )
    out = _call(client, "generate", model=str(flux))
    assert out["status"].startswith(demo_app.ERROR_PREFIX) and "renders video pipelines" in out["status"]


# ------------------------------------------------------------------------------------- engine, without a page


def test_cancel_stops_a_running_job_and_the_engine_keeps_working(tmp_path):
    engine = Engine(device="cpu", out_dir=tmp_path, warm_up=False)
    request = requests.parse_request(PROMPT, "embedded", "balanced", frames=5, height=32, width=32, steps=500)
    outcome: dict = {}

    def run():
        try:
            engine.run(request, session="s")
        except Cancelled as exc:
            outcome["cancelled"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while not engine.cancel("s"):  # not registered until the job holds the engine
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    worker.join(60)
    assert not worker.is_alive()
    exc = outcome.get("cancelled")
    assert exc is not None and exc.steps == 500 and exc.step < 500, outcome
    assert not engine.cancel("s")  # nothing running any more
    small = requests.parse_request(PROMPT, "embedded", "dense", frames=5, height=32, width=32, steps=2)
    result = engine.run(small, compare=True)
    assert math.isinf(result.psnr_mean)  # a clean run after the stop: dense preset equals stock


def test_timing_command_times_generate_and_compare(tmp_path, capsys):
    """The command that times the page's jobs (run on a GPU at its default geometry) works end to end."""
    from dit_accel.demo import timing

    out = tmp_path / "timing.json"
    argv = ["--device", "cpu", "--presets", "fast", "--repeats", "1", "--out", str(out)]
    assert timing.main(argv + [f"--{k}={v}" for k, v in SMALL.items()]) == 0
    result = json.loads(out.read_text())
    assert result["geometry"] == SMALL
    compare = result["presets"]["fast"]["compare"]["median"]
    assert compare["dense_s"] > 0 and compare["accelerated_s"] > 0 and compare["job_s"] >= compare["dense_s"]
    assert "| fast |" in capsys.readouterr().out


def test_launch_binds_locally_without_share_and_warns_for_other_hosts(monkeypatch, caplog, tmp_path):
    import gradio as gr

    calls = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: calls.append(kw) or (None, "http://x/", None))
    engine = Engine(device="cpu", out_dir=tmp_path, warm_up=False)
    demo_app.launch(engine, block=False)
    assert calls[-1]["server_name"] == "127.0.0.1" and calls[-1]["share"] is False
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="dit_accel.demo"):
        demo_app.launch(engine, host="0.0.0.0", block=False)
    assert calls[-1]["server_name"] == "0.0.0.0" and calls[-1]["share"] is False
    assert any("anyone who can reach this machine" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------- requests, pictures


def test_example_prompts_are_captions_the_embedded_model_knows():
    for prompt in demo_app.EXAMPLE_PROMPTS:
        assert parse_caption(prompt) is not None, prompt


def test_parse_request():
    r = requests.parse_request(
        " a red circle ",
        "",
        "fast",
        "rettention",
        "adaspa",
        0.9,
        None,
        0.25,
        3.0,
        "ramp=0.02, clamp=False",
        seed=7.0,
        steps=8,
        frames=17,
        height=96,
        width=128,
    )
    assert r.prompt == "a red circle" and r.model == "embedded" and r.method == "rettention"
    assert dict(r.knobs) == {
        "base": "adaspa",
        "sparsity": 0.9,
        "dense_steps": 0.25,
        "refresh_every": 3,
        "ramp": 0.02,
        "clamp": False,
    }
    assert r.seed == 7 and r.call_kwargs()["num_inference_steps"] == 8
    assert requests.parse_request("p", "embedded", "balanced", dense_steps=3.0).knobs == {"dense_steps": 3}
    assert requests.parse_request("p", "embedded", "balanced", dense_steps=0).knobs == {"dense_steps": 0}
    for kwargs, message in [
        ({"preset": "turbo"}, "unknown preset"),
        ({"method": "flash"}, "unknown method"),
        ({"steps": 0}, "steps: must be at least 1"),
        ({"frames": 8.5}, "frames: expected a whole number"),
        ({"seed": -1}, "seed: must be at least 0"),
        ({"more_knobs": "tau"}, "expected key=value"),
        ({"more_knobs": "tau=0.9, tau=0.8"}, "given twice"),
        ({"sparsity": 0.5, "more_knobs": "sparsity=0.6"}, "its own field"),
        ({"more_knobs": "method='window'"}, "method field"),
        ({"refresh_every": 0}, "refresh period"),
    ]:
        fields = {"prompt": "p", "model": "embedded", "preset": "balanced", **kwargs}
        with pytest.raises(requests.RequestError, match=message):
            requests.parse_request(**fields)


def test_settings_for_presets_methods_and_unknown_knobs():
    def settings(**kw):
        return requests.settings_for(requests.parse_request("p", "embedded", **kw), "wan")

    s = settings(preset="fast")
    fast = {"density": 0.05, "dense_steps": 0.1, "refresh_at": (0.3,), "fuse_blocks": True}
    assert (s.preset, s.method, dict(s.knobs)) == ("fast", "rettention", fast)
    s = settings(preset="fast", method="rettention", density=0.1)  # the preset's method: knobs on the preset
    assert (s.preset, dict(s.knobs)) == ("fast", {**fast, "density": 0.1})
    s = settings(preset="fast", refresh_every=5)  # the page's refresh field replaces the preset's refresh_at
    assert dict(s.knobs) == {"density": 0.05, "dense_steps": 0.1, "refresh_every": 5, "fuse_blocks": True}
    s = settings(preset="fast", method="window", density=0.3)  # another method replaces the preset
    assert (s.preset, s.method, dict(s.knobs)) == (None, "window", {"density": 0.3})
    with pytest.raises(requests.RequestError, match=r"takes \['density', 'per_frame'\], not \['sparsity'\]"):
        settings(preset="fast", sparsity=0.3)
    s = settings(preset="balanced", density=0.1)  # balanced is re-ttention on the window: density is its knob
    lean = (0.2, 0.4, 0.6, 0.8)
    assert (s.method, s.knobs["density"], s.knobs["refresh_at"]) == ("rettention", 0.1, lean)
    with pytest.raises(requests.RequestError, match="takes no knob 'nonsense'"):
        settings(preset="quality", more_knobs="nonsense=1")


def test_geometry_and_memory_checks():
    class Pipe:  # the embedded model's factors: 4x temporal, 4x spatial VAE, 4x4 patches
        vae_scale_factor_temporal, vae_scale_factor_spatial = 4, 4

        class transformer:  # noqa: N801
            class config:  # noqa: N801
                patch_size = (1, 4, 4)

    assert requests.geometry_rules(Pipe) == (4, 16)
    ok = requests.parse_request("p", "embedded", "balanced", frames=17, height=96, width=128)
    requests.check_geometry(ok, Pipe)
    for kwargs, message in [({"frames": 15}, r"e\.g\. 13 or 17"), ({"width": 120}, r"e\.g\. 112 or 128")]:
        bad = requests.parse_request("p", "embedded", "balanced", **{**SMALL, **kwargs})
        with pytest.raises(requests.RequestError, match=message):
            requests.check_geometry(bad, Pipe)
    need = requests.estimate_bytes(ok)
    assert 300 * 2**20 < need < 2**30  # measured: about 0.2 GiB beyond the model at 17x96x128
    requests.check_memory(ok, need + 1)
    requests.check_memory(ok, None)
    with pytest.raises(requests.RequestError, match="will not fit in memory"):
        requests.check_memory(ok, need - 1)


def test_pictures_from_records_and_plans():
    from dit_accel.kernels import BlockPlan

    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[0, 0] = torch.eye(4, dtype=torch.bool)
    mask[0, 1] = True
    plan = BlockPlan.from_block_mask(mask, 16, 16)
    geometry = {"grid": [2, 4, 8], "block_q": 16, "text_len": 0, "text_position": None}

    class Patterns:
        plans = {("cond", f"l{i}"): [[1, geometry, plan]] for i in range(2)}

    records = [
        {
            "context": c,
            "step": s,
            "layer": f"l{i}",
            "kind": "dense" if s == 0 else "sparse",
            "density": 1.0 if s == 0 else 0.25 + 0.5 * i,
        }
        for s in range(3)
        for c in ("cond", "uncond")
        for i in range(2)
    ]
    view = pictures.RunView(records, Patterns(), "test")
    assert (view.layers, view.steps, view.heads, view.context) == (["l0", "l1"], 3, 2, "cond")
    np.testing.assert_allclose(view.density_grid(), [[1.0, 0.25, 0.25], [1.0, 0.75, 0.75]])
    img = np.asarray(view.pattern_image(0, 0, 2))
    kept = np.all(img == pictures._KEPT, axis=-1).sum()
    skipped = np.all(img == pictures._SKIPPED, axis=-1).sum()
    assert kept > 0 and skipped == pytest.approx(3 * kept, rel=0.1)  # the diagonal: 4 of 16 blocks
    full = np.asarray(view.pattern_image(0, 1, 2))
    assert np.all(full == pictures._KEPT, axis=-1).sum() > 3 * kept  # head 1 keeps every block
    dense = np.asarray(view.pattern_image(0, 0, 0))  # step 0 was dense: a message, no grid
    assert not np.all(dense == pictures._KEPT, axis=-1).any()
    assert view.density_image().width >= 400
    assert pictures._frame_lines(geometry) == [2.0]


# ----------------------------------------------------------------------------------------------- the command


def test_demo_command_arguments(capsys):
    args = cli.build_parser().parse_args(["demo", "--port", "8000", "--model", "embedded", "--device", "cpu"])
    assert (args.command, args.port, args.host, args.model, args.device) == (
        "demo",
        8000,
        "127.0.0.1",
        "embedded",
        "cpu",
    )
    for argv, message in [
        (["demo", "--model", "/nonexistent/pipeline"], "no pipeline folder"),
        (["demo", "--port", "70000"], "--port"),
    ] + ([] if torch.cuda.is_available() else [(["demo", "--device", "cuda"], "sees no CUDA device")]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_demo_is_installed_with_the_package():
    import dit_accel.demo

    assert Path(dit_accel.demo.__file__).parent.name == "demo"
