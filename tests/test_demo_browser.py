"""The demo in a real headless Chromium (Debian's ``chromium``, driven by Playwright with that browser): load
the page, type a prompt, click "Compare with dense", wait for both videos, the numbers and the pictures, check
that the page made no request off 127.0.0.1 and shows no error, save a screenshot; then start a long render,
watch its progress bar and stop it.

The app runs the embedded model on CPU at a small geometry and few steps. The screenshot goes to the test's
temporary folder; with ``$DIT_ACCEL_DEMO_SCREENSHOT`` set the page keeps its CPU defaults (17 frames x 96 x
128, 10 steps: what a person first sees) and the screenshot is also written there (docs/demo.png is taken
that way). Without Chromium, Playwright or gradio the test skips locally and fails in CI (``CI`` set, as
.ci/run does): ``apt-get install chromium chromium-driver``, ``pip install "dit-accel[demo]" playwright``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

CHROMIUM = os.environ.get("DIT_ACCEL_CHROMIUM", "/usr/bin/chromium")
# Flags for a root user in a container, and no lookups or background requests from the browser itself.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-pings",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
RENDER_TIMEOUT_MS = 180_000
SCREENSHOT = os.environ.get("DIT_ACCEL_DEMO_SCREENSHOT")
SMALL = {"frames": 9, "height": 64, "width": 96, "steps": 4}


def _unavailable(message: str):
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI needs the browser test to run)", pytrace=False)
    pytest.skip(message)


def _local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or parts.hostname in ("127.0.0.1", "localhost")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"no Chromium at {CHROMIUM}: apt-get install chromium chromium-driver")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed: pip install playwright (the system Chromium is used)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    try:
        from dit_accel.demo.app import launch
        from dit_accel.demo.engine import Engine
    except ImportError as exc:
        _unavailable(f'the demo needs gradio: pip install "dit-accel[demo]" ({exc})')
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    engine = Engine(device="cpu", out_dir=tmp_path_factory.mktemp("demo_out"))
    defaults = None if SCREENSHOT else SMALL
    blocks, url = launch(engine, port=_free_port(), defaults=defaults, block=False, quiet=True)
    yield engine, url
    blocks.close()
    torch.set_num_threads(threads)


def _errors_shown(page) -> list[str]:
    """Error toasts and error statuses on the page (Gradio's own and the demo's)."""
    from dit_accel.demo.app import ERROR_PREFIX

    shown = [t.inner_text() for t in page.locator(".toast-body.error").all()]
    status = page.locator("#status").inner_text()
    if status.startswith(ERROR_PREFIX.strip("*")) or "Error" in status:
        shown.append(status)
    return shown


def test_compare_in_a_browser(browser, app, tmp_path):
    from dit_accel.demo.app import EXAMPLE_PROMPTS

    engine, url = app
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    outside: list[str] = []
    page.on("request", lambda r: None if _local(r.url) else outside.append(r.url))
    page.on("websocket", lambda ws: None if _local(ws.url) else outside.append(ws.url))
    page.goto(url)
    page.wait_for_selector("#prompt textarea")
    page.locator("#prompt textarea").fill(EXAMPLE_PROMPTS[1])
    page.locator("#compare").click()
    page.wait_for_function(
        "() => document.querySelector('#status')?.innerText.includes('Compared with dense')",
        timeout=RENDER_TIMEOUT_MS,
    )
    for video in ("#dense_video", "#out_video"):  # decoded far enough to show a frame
        page.wait_for_function(f"() => document.querySelector('{video} video')?.readyState >= 2")
    for picture in ("#pattern", "#density_plot"):
        page.wait_for_function(f"() => document.querySelector('{picture} img')?.naturalWidth > 0")
    numbers = page.locator("#numbers").inner_text()
    for label in ("wall time", "speedup", "PSNR vs dense", "SSIM vs dense", "computed"):
        assert label in numbers, numbers
    status = page.locator("#status").inner_text()
    assert EXAMPLE_PROMPTS[1] not in status and "preset balanced" in status, status
    assert _errors_shown(page) == []
    page.mouse.move(0, 0)
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if SCREENSHOT:
        shutil.copyfile(shot, SCREENSHOT)
    assert outside == [], f"the page made requests off 127.0.0.1: {outside}"
    page.close()


def test_progress_and_stop_in_a_browser(browser, app):
    """A long render shows its progress over the steps, and Stop ends it within a step or two."""
    engine, url = app
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url)
    page.wait_for_selector("#prompt textarea")
    page.locator("#prompt textarea").fill("a small red circle moving up on a white background")
    page.locator("#steps input").fill("400")
    page.locator("#generate").click()
    page.wait_for_function("() => document.body.innerText.includes('/400')", timeout=RENDER_TIMEOUT_MS)
    assert engine.busy()
    page.locator("#stop").click()
    page.wait_for_function(
        "() => document.querySelector('#status')?.innerText.includes('Stopped')", timeout=30_000
    )
    status = page.locator("#status").inner_text()
    step, steps = map(int, re.search(r"after step (\d+) of (\d+)", status).groups())
    assert steps == 400 and step < 400, status
    assert not engine.busy()
    assert _errors_shown(page) == []
    page.close()
