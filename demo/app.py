"""The Gradio page: type a prompt, pick a preset, see the clip, its time, how close it stays to dense and the
attention pattern it used.

    dit-accel demo                          # http://127.0.0.1:7860, the embedded model, cuda when present
    dit-accel demo --model ./wan_pipeline --device cuda --port 7861

    from dit_accel.demo.app import build_app, launch
    blocks, url = launch(device="cpu", block=False)   # serve in the background; blocks.close() stops it

"Generate" renders accelerated; "Compare with dense" renders stock attention and accelerated with the same
seed and shows both with wall times, speedup, PSNR/SSIM and density. Below them, the block plan of a chosen
layer, head and step, and the density of every layer over the steps, drawn from the run's stats and saved
plans. One job runs at a time (the others queue); Stop ends the session's running job at its next step.
Every request is checked first: a bad one gets a message in the status line and the app keeps serving.

Offline by design: analytics off, no share link, bound to 127.0.0.1 unless another host is asked for, the
page's fonts and scripts served by Gradio itself, models loaded only from the package or a local folder.
"""

from __future__ import annotations

import logging
import math
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

import gradio as gr  # noqa: E402

from dit_accel.methods import method_knobs, method_names  # noqa: E402
from dit_accel.pipelines.presets import PRESET_NAMES, config_fields  # noqa: E402

from .engine import Cancelled, Engine, Result  # noqa: E402
from .pictures import RunView  # noqa: E402
from .requests import BASES, DEFAULT_BASE, PRESET_METHOD, RequestError, parse_request  # noqa: E402

__all__ = ["EXAMPLE_PROMPTS", "LOCAL_HOSTS", "build_app", "launch"]

logger = logging.getLogger("dit_accel.demo")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# Captions of the embedded model's grammar (size, colour, shape, motion, background; a test parses them).
EXAMPLE_PROMPTS = (
    "a large red circle moving right on a black background",
    "a small blue square orbiting clockwise on a gray background",
    "a large yellow triangle bouncing up and down on a white background",
    "a small green circle moving up on a checkered background",
    "a large magenta square bouncing left and right on a black background",
)
ERROR_PREFIX = "**Cannot render.**"

_CSS = """
#status p { margin: 0.2em 0; }
#numbers table { width: 100%; }
#numbers td, #numbers th { padding: 4px 8px; }
.dit-header p { margin-bottom: 0; }
.dit-hint p { font-size: 0.85em; opacity: 0.75; margin: -0.4em 0 0 0; }
"""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _db(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "–"
    return "identical (∞ dB)" if math.isinf(x) else f"{x:.2f} dB"


def numbers_markdown(result: Result) -> str:
    """The numbers panel: times, speedup, PSNR/SSIM against dense, density."""
    blocks = (
        f"{_pct(result.density)} of blocks in {result.sparse_calls} sparse of {result.calls} calls "
        f"(all calls: {_pct(result.overall_density)})"
        if result.sparse_calls
        else f"every block (all {result.calls} calls dense)"
    )
    if result.dense_video is None:
        rows = [
            "| | accelerated |",
            "|---|---|",
            f"| wall time | {result.seconds:.2f} s |",
            f"| computed | {blocks} |",
        ]
    else:
        finite = [p for p in result.psnr if math.isfinite(p)]
        worst = f" (worst frame {min(finite):.2f} dB)" if finite and len(finite) > 1 else ""
        rows = [
            "| | dense | accelerated |",
            "|---|---|---|",
            f"| wall time | {result.seconds_dense:.2f} s | {result.seconds:.2f} s |",
            f"| speedup | | **{result.speedup:.2f}×** |",
            f"| PSNR vs dense | | {_db(result.psnr_mean)}{worst} |",
            f"| SSIM vs dense | | {result.ssim_mean:.4f} |",
            f"| computed | every block | {blocks} |",
        ]
    note = ""
    if result.device.startswith("cuda"):
        note = "\n\nThe first accelerated run on a GPU includes compiling dit_accel's kernels."
    return "\n".join(rows) + note


def _status(result: Result, compare: bool) -> str:
    r = result.request
    what = "Compared with dense" if compare else "Generated"
    return f"**{what}**: {r.geometry}, {r.steps} steps, seed {r.seed}, on {result.device}; {result.settings}."


def _knob_help() -> str:
    lines = [f"- **{m}**: {', '.join(method_knobs(m)) or 'no knobs'}" for m in method_names()]
    return (
        "Empty fields keep the preset's values. A method other than the preset's replaces the preset. "
        "Knobs per method:\n" + "\n".join(lines) + f"\n- every method: {', '.join(config_fields())}"
    )


def build_app(engine: Engine, defaults: dict | None = None) -> gr.Blocks:
    """The page for ``engine`` (its queue is set up: one render at a time).

    Args:
        engine: the :class:`~dit_accel.demo.engine.Engine` that renders.
        defaults: the fields' starting values (``frames``, ``height``, ``width``, ``steps``, ``seed``,
            ``preset``, ``prompt``); default: the embedded model's geometry for the engine's device.
    """
    d = {**engine.defaults(), "seed": 0, "preset": "balanced", "prompt": "", **(defaults or {})}
    model_line = (
        "the embedded model (a 14M-parameter Wan text-to-video model trained on moving shapes)"
        if engine.model == "embedded"
        else f"the pipeline in `{engine.model}`"
    )
    # Gradio copies every returned file into its cache: files older than an hour go, checked hourly.
    with gr.Blocks(analytics_enabled=False, title="dit_accel demo", delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(
            "## dit_accel: sparse attention for diffusion transformers\n"
            f"Renders with {model_line} on **{engine.device}**. *Generate* renders with sparse attention; "
            "*Compare with dense* also renders stock attention with the same seed and measures the "
            "difference.",
            elem_classes=["dit-header"],
        )
        state = gr.State(None)  # the latest run's RunView
        pick = gr.State((None, 0, None))  # (layer, head, step) last chosen; None: the middle layer, last step
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(
                    label="Prompt",
                    value=d["prompt"],
                    lines=2,
                    elem_id="prompt",
                    placeholder="a large red circle moving right on a black background",
                )
                gr.Examples(
                    [[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Prompts the embedded model knows"
                )
                with gr.Row():
                    model = gr.Textbox(
                        label="Model",
                        value=engine.model,
                        elem_id="model",
                        info="embedded, or a local diffusers pipeline folder",
                    )
                    preset = gr.Dropdown(
                        list(PRESET_NAMES),
                        value=d["preset"],
                        label="Preset",
                        elem_id="preset",
                        info="dense, quality, balanced, fast",
                    )
                with gr.Row():
                    small = dict(precision=0, min_width=70)
                    steps = gr.Number(value=d["steps"], label="Steps", elem_id="steps", **small)
                    frames = gr.Number(value=d["frames"], label="Frames", elem_id="frames", **small)
                    height = gr.Number(value=d["height"], label="Height", elem_id="height", **small)
                    width = gr.Number(value=d["width"], label="Width", elem_id="width", **small)
                    seed = gr.Number(value=d["seed"], label="Seed", elem_id="seed", **small)
                gr.Markdown(
                    "Frames 4k + 1; height and width multiples of 16 for the embedded model.",
                    elem_classes=["dit-hint"],
                )
                with gr.Accordion("Advanced: method and knobs", open=False):
                    with gr.Row():
                        method = gr.Dropdown(
                            [PRESET_METHOD, *method_names()],
                            value=PRESET_METHOD,
                            label="Method",
                            elem_id="method",
                        )
                        base = gr.Dropdown(
                            [DEFAULT_BASE, *BASES],
                            value=DEFAULT_BASE,
                            label="Base pattern (rettention)",
                            elem_id="base",
                        )
                    with gr.Row():
                        sparsity = gr.Number(value=None, label="Sparsity (adaspa)", elem_id="sparsity")
                        density = gr.Number(value=None, label="Density (window)", elem_id="density")
                    with gr.Row():
                        dense_steps = gr.Number(
                            value=None,
                            label="Dense steps",
                            elem_id="dense_steps",
                            info="a count, or a fraction in [0, 1)",
                        )
                        refresh_every = gr.Number(
                            value=None,
                            label="Refresh period (rettention)",
                            precision=0,
                            elem_id="refresh_every",
                        )
                    more_knobs = gr.Textbox(
                        label="More knobs", placeholder="tau=0.9, head_adaptive=False", elem_id="more_knobs"
                    )
                    gr.Markdown(_knob_help())
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate", min_width=80)
                    compare_btn = gr.Button(
                        "Compare with dense", variant="secondary", elem_id="compare", scale=2, min_width=170
                    )
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop", min_width=60)
                status = gr.Markdown(
                    "Type a prompt, then Generate or Compare with dense.", label="status", elem_id="status"
                )
            with gr.Column(scale=3, min_width=420):
                with gr.Row():
                    dense_video = gr.Video(
                        label="Dense (stock attention)",
                        elem_id="dense_video",
                        autoplay=True,
                        loop=True,
                        buttons=["download"],
                        interactive=False,
                    )
                    out_video = gr.Video(
                        label="Accelerated",
                        elem_id="out_video",
                        autoplay=True,
                        loop=True,
                        buttons=["download"],
                        interactive=False,
                    )
                numbers = gr.Markdown("", label="numbers", elem_id="numbers")
        with gr.Row():
            with gr.Column():
                pattern = gr.Image(
                    label="Attention pattern (block plan)",
                    elem_id="pattern",
                    type="pil",
                    format="png",
                    interactive=False,
                    show_label=False,
                    buttons=["download", "fullscreen"],
                )
                with gr.Row():
                    layer = gr.Slider(0, 5, value=0, step=1, label="Layer", elem_id="layer")
                    head = gr.Slider(0, 5, value=0, step=1, label="Head", elem_id="head")
                    step = gr.Slider(
                        0,
                        max(int(d["steps"]) - 1, 1),
                        value=int(d["steps"]) - 1,
                        step=1,
                        label="Step",
                        elem_id="step",
                    )
            with gr.Column():
                density_img = gr.Image(
                    label="Density per layer over the steps",
                    elem_id="density_plot",
                    type="pil",
                    format="png",
                    interactive=False,
                    show_label=False,
                    buttons=["download", "fullscreen"],
                )

        fields = [prompt, model, preset, method, base, sparsity, density, dense_steps, refresh_every]
        fields += [more_knobs, seed, steps, frames, height, width, pick]
        outputs = [status, dense_video, out_video, numbers, pattern, density_img, layer, head, step]
        outputs += [state, pick]

        def job(compare, values, pick, request):
            session = getattr(request, "session_hash", None)
            try:
                req = parse_request(*values)
                result = engine.run(req, compare=compare, session=session)
            except RequestError as exc:
                return _message(f"{ERROR_PREFIX} {exc}")
            except Cancelled as exc:
                return _message(f"**Stopped** ({exc}).")
            except Exception as exc:  # the page gets one line; the server log gets the traceback
                logger.exception("dit_accel demo: rendering failed")
                return _message(f"{ERROR_PREFIX} rendering failed: {type(exc).__name__}: {exc}")
            view = result.view
            n_layers, n_heads, n_steps = max(len(view.layers), 1), view.heads, max(view.steps, 1)
            lyr = n_layers // 2 if pick[0] is None else min(int(pick[0]), n_layers - 1)
            hd = min(int(pick[1] or 0), n_heads - 1)
            stp = n_steps - 1 if pick[2] is None else min(int(pick[2]), n_steps - 1)
            return (
                _status(result, compare),
                str(result.dense_video) if result.dense_video else None,
                str(result.video),
                numbers_markdown(result),
                view.pattern_image(lyr, hd, stp),
                view.density_image(),
                gr.Slider(minimum=0, maximum=max(n_layers - 1, 1), value=lyr, interactive=n_layers > 1),
                gr.Slider(minimum=0, maximum=max(n_heads - 1, 1), value=hd, interactive=n_heads > 1),
                gr.Slider(minimum=0, maximum=max(n_steps - 1, 1), value=stp, interactive=n_steps > 1),
                view,
                (pick[0] if pick[0] is None else lyr, hd, None if pick[2] is None else stp),
            )

        def endpoint(compare: bool):
            """The Generate / Compare function; its parameter names are the API's (gradio_client keywords).
            Gradio finds the progress tracker by its default value."""

            def run(
                prompt, model, preset, method, base, sparsity, density, dense_steps, refresh_every,
                more_knobs, seed, steps, frames, height, width, pick=(None, 0, None),
                request: gr.Request = None, progress=gr.Progress(track_tqdm=True),  # noqa: B008
            ):  # fmt: skip
                values = (prompt, model, preset, method, base, sparsity, density, dense_steps, refresh_every)
                values += (more_knobs, seed, steps, frames, height, width)
                return job(compare, values, pick, request)

            run.__name__ = "compare" if compare else "generate"
            return run

        def redraw(view: RunView | None, layer, head, step):
            if view is None:
                return gr.skip(), (int(layer), int(head), None)
            last = int(step) >= view.steps - 1  # the last step stays the last when the next run has more
            return view.pattern_image(int(layer), int(head), int(step)), (
                int(layer),
                int(head),
                None if last else int(step),
            )

        def stop(request: gr.Request = None):
            stopped = engine.cancel(getattr(request, "session_hash", None))
            return "**Stopping** at the next step…" if stopped else "Nothing is running."

        render = dict(concurrency_id="render", concurrency_limit=1, show_progress="full")
        generate_btn.click(endpoint(False), fields, outputs, api_name="generate", **render)
        compare_btn.click(endpoint(True), fields, outputs, api_name="compare", **render)
        prompt.submit(endpoint(False), fields, outputs, api_visibility="private", **render)
        # Stop sets the engine's flag (outside the queue, so it is not stuck behind the job it stops): the job
        # ends at its next step and reports it. Gradio's own ``cancels=`` is not used: it lets a running
        # function finish anyway, and marks every output of the cancelled event "Error" on the page.
        stop_btn.click(stop, None, [status], queue=False, api_visibility="private")
        for slider in (layer, head, step):
            slider.release(
                redraw,
                [state, layer, head, step],
                [pattern, pick],
                api_visibility="private",
                concurrency_limit=None,
                show_progress="hidden",
            )
    blocks.queue(default_concurrency_limit=1)
    return blocks


def _message(text: str):
    """Outputs that show ``text`` in the status line and leave everything else as it is."""
    return (text, *(gr.skip() for _ in range(10)))


def launch(
    engine: Engine | None = None,
    *,
    model: str = "embedded",
    device: str = "auto",
    host: str = "127.0.0.1",
    port: int | None = None,
    defaults: dict | None = None,
    block: bool = True,
    quiet: bool = False,
):
    """Build the page and serve it.

    Args:
        engine: an :class:`Engine` (default: one for ``model`` and ``device``).
        host: the address to bind: 127.0.0.1 unless asked; another host is served with a warning.
        port: the port (default: Gradio's, 7860 or the next free one).
        defaults: starting values of the fields (see :func:`build_app`).
        block: serve until interrupted; False returns at once (``blocks.close()`` stops it).

    Returns:
        (blocks, url).
    """
    engine = engine or Engine(model=model, device=device)
    if host not in LOCAL_HOSTS:
        logger.warning(
            "dit_accel demo: serving on %s: anyone who can reach this machine on that port can use the demo "
            "and its %s",
            host,
            engine.device,
        )
    blocks = build_app(engine, defaults)
    _, url, _ = blocks.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        prevent_thread_lock=not block,
        quiet=quiet,
        allowed_paths=[str(engine.out_dir)],
        css=_CSS,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
    )
    return blocks, url
