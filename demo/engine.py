"""The demo's renderer: one pipeline loaded at a time, one job at a time, each job checked before it renders.

:class:`Engine` turns a checked :class:`~.requests.Request` into a :class:`Result`: the accelerated clip (and
the dense one when comparing) as H.264 mp4 files, wall times, PSNR/SSIM against dense, density, and a
:class:`~.pictures.RunView` of the run's stats and saved block plans. It composes the public API only:
``dit_accel.pipelines.load_pipeline`` / ``wrap``, ``AcceleratedPipeline.compare`` and ``stats``, and the
``save_patterns`` config field read back with ``dit_accel.methods.persist.load_patterns``.

    engine = Engine(model="embedded", device="cpu")
    result = engine.run(parse_request("a large red circle moving right on a black background", "embedded",
                                      "balanced"), compare=True)
    print(result.seconds_dense, result.seconds, result.psnr_mean, result.density)
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import dit_accel
from dit_accel.methods.persist import load_patterns
from dit_accel.pipelines import quality, wrapped
from dit_accel.pipelines.presets import FAMILIES
from dit_accel.pipelines.tiny_video.model import WeightsNotFoundError, render_defaults

from .pictures import RunView
from .requests import Request, RequestError, check_geometry, check_memory, geometry_rules, settings_for

__all__ = ["Cancelled", "Engine", "Result", "available_bytes", "resolve_device", "write_video"]

logger = logging.getLogger("dit_accel.demo")

FPS = 16
GUIDANCE = 5.0  # the embedded model's (dit-accel render's default)


class Cancelled(Exception):
    """The job was stopped from the page; ``step`` steps of ``steps`` had finished in the render stopped."""

    def __init__(self, step: int, steps: int):
        super().__init__(f"stopped after step {step} of {steps}")
        self.step, self.steps = step, steps


@dataclass
class Result:
    """A finished job (see the module docstring). Comparison fields are None after a plain generation.

    Attributes:
        video, dense_video: mp4 files of the accelerated and the dense clip (the first clip of the output).
        seconds, seconds_dense: wall time of each render (CUDA-synchronised).
        psnr, ssim: per frame, accelerated against dense; psnr_mean (inf when identical), ssim_mean.
        density: mean fraction of blocks computed by the sparse calls (1.0 without any);
            plan_density over the calls that ran only a plan's blocks (None without any);
            overall_density counts dense calls as 1.0; sparse_calls of calls.
        settings: what ran (preset, method, knobs); view: the run's stats and saved plans for the pictures.
    """

    request: Request
    device: str
    family: str
    settings: str
    video: Path
    seconds: float
    density: float
    plan_density: float | None
    overall_density: float
    sparse_calls: int
    calls: int
    view: RunView
    dense_video: Path | None = None
    seconds_dense: float | None = None
    psnr: list[float] | None = None
    ssim: list[float] | None = None
    psnr_mean: float | None = None
    ssim_mean: float | None = None

    @property
    def speedup(self) -> float | None:
        if self.seconds_dense is None or self.seconds <= 0:
            return None
        return self.seconds_dense / self.seconds


def resolve_device(device: str | None) -> str:
    """ "auto" (or None): cuda when torch sees a GPU, else cpu; "cuda" without a GPU is a ValueError."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA device; use cpu")
    return str(device)


def available_bytes(device: str) -> int | None:
    """Memory a render can still take: free GPU memory plus what torch's allocator holds unused, or the
    host's MemAvailable on CPU (None where it cannot be read)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_video(frames: np.ndarray, path: Path, fps: int = FPS) -> Path:
    """Write [F, H, W, 3] frames in [0, 1] as H.264 yuv420p mp4 (plays in every browser; Gradio serves the
    file as it is)."""
    import imageio.v2 as imageio

    data = (np.clip(np.asarray(frames), 0, 1) * 255).round().astype(np.uint8)
    imageio.mimwrite(
        str(path),
        list(data),
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=2,
        ffmpeg_params=["-movflags", "+faststart"],
    )
    return path


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _describe(settings) -> str:
    knobs = {k: v for k, v in settings.knobs.items() if k != "save_patterns"}
    head = f"preset {settings.preset}: " if settings.preset else ""
    inner = ", ".join(f"{k}={v!r}" for k, v in knobs.items())
    return f"{head}{settings.method_name}" + (f" ({inner})" if inner else "")


class Engine:
    """Loads pipelines (one at a time) and runs jobs (one at a time) for the page.

    Args:
        model: the model the page starts with: "embedded" or a local diffusers pipeline folder.
        device: "auto", "cpu", "cuda" or "cuda:N".
        out_dir: where clips and pattern files go (default: a new temporary folder); the newest
            ``keep_jobs`` jobs are kept.
        warm_up: render two steps at the smallest geometry after loading a model (see ``_warm_up``).
    """

    def __init__(
        self, model: str = "embedded", device: str = "auto", out_dir=None, keep_jobs: int = 16, warm_up=True
    ):
        self.device = resolve_device(device)
        self.model = model
        self.out_dir = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="dit_accel_demo_"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.keep_jobs = keep_jobs
        self.warm_up = warm_up
        self._lock = threading.Lock()
        self._jobs: dict[str, threading.Event] = {}
        self._jobs_lock = threading.Lock()
        self._counter = itertools.count()
        self._loaded: tuple[str, object, str] | None = None

    # --- models ------------------------------------------------------------------------------------
    def defaults(self) -> dict:
        """The page's starting values: the embedded model's geometry and steps for this device."""
        d = render_defaults(self.device)
        return {"frames": d["frames"], "height": d["height"], "width": d["width"], "steps": d["steps"]}

    def family_of(self, model: str) -> str:
        """The family of ``model`` without loading it (RequestError for what the demo cannot load)."""
        try:
            kind, _ = wrapped.source_kind(model)
            if kind == "hub":
                raise RequestError(
                    f"model: no folder at {model!r}. The demo loads the embedded model or a local diffusers "
                    "pipeline folder (written by save_pretrained), never from the network"
                )
            family = wrapped.family_of_source(model)
        except ValueError as exc:
            raise RequestError(f"model: {exc}") from None
        if FAMILIES.get(family) != "video":
            raise RequestError(
                f"model: {model} is a {family} pipeline ({FAMILIES.get(family, 'unknown')}); the demo "
                "renders video pipelines. Render images with: dit-accel render --model PATH --out image.png"
            )
        return family

    def load(self, model: str):
        """(stock pipeline, family) of ``model``, loaded once and kept until another model is asked for."""
        key = model if model == "embedded" else str(Path(model).expanduser().resolve())
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1], self._loaded[2]
        family = self.family_of(model)
        self._loaded = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        embedded = wrapped.source_kind(model)[0] == "embedded"
        dtype = None if embedded else (torch.bfloat16 if self.device.startswith("cuda") else torch.float32)
        try:
            pipe = wrapped.load_pipeline(model, torch_dtype=dtype, device=self.device)
        except WeightsNotFoundError as exc:
            raise RequestError(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise RequestError(f"model: cannot load {model}: {exc}") from None
        self._loaded = (key, pipe, family)
        if self.warm_up:
            self._warm_up(pipe, family)
        return pipe, family

    def _warm_up(self, pipe, family: str) -> None:
        """One step at the smallest geometry, stock and with the default preset, so that the first job's times
        (and a comparison's speedup) do not include one-time costs: allocator growth, library
        initialisation, compiling dit_accel's kernels."""
        temporal, multiple = geometry_rules(pipe)
        call = {
            "prompt": "warm-up",
            "num_frames": temporal + 1,
            "height": 2 * multiple,
            "width": 2 * multiple,
            "num_inference_steps": 2,
            "output_type": "np",
        }
        config = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)
        try:
            pipe(**call)
            wrapped.wrap(pipe, "balanced")(**call)
        except Exception as exc:  # a pipeline that cannot render this small: its first job pays instead
            logger.info("dit_accel demo: warm-up skipped (%s: %s)", type(exc).__name__, exc)
        finally:
            dit_accel.remove(pipe)
            pipe.set_progress_bar_config(**config)
            pipe._progress_bar_config = config

    # --- jobs --------------------------------------------------------------------------------------
    def cancel(self, session: str | None) -> bool:
        """Stop the running job of ``session`` at its next step; False when it has none."""
        with self._jobs_lock:
            event = self._jobs.get(session or "")
        if event is None:
            return False
        event.set()
        return True

    def busy(self) -> bool:
        return self._lock.locked()

    def _job_dir(self) -> Path:
        job = next(self._counter)
        folder = self.out_dir / f"job{job:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        old = sorted(p for p in self.out_dir.glob("job*") if p.is_dir() and p != folder)
        for p in old[: max(len(old) - self.keep_jobs + 1, 0)]:
            shutil.rmtree(p, ignore_errors=True)
        return folder

    def run(self, request: Request, compare: bool = False, session: str | None = None) -> Result:
        """Render ``request`` accelerated (and dense with the same seed when ``compare``).

        Raises:
            RequestError: the model, knobs, geometry or memory refuse the request; the render ran out of
                memory; the pipeline refused the call.
            Cancelled: :meth:`cancel` was called for ``session``.
        """
        cancel = threading.Event()
        with self._lock:
            with self._jobs_lock:
                self._jobs[session or ""] = cancel
            try:
                return self._run(request, compare, cancel)
            except (RequestError, Cancelled):
                raise
            except Exception as exc:
                if _is_oom(exc):
                    if self.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                    raise RequestError(
                        f"{request.geometry} ran out of memory on {self.device}: use fewer frames, a smaller "
                        "size, or fewer steps"
                    ) from None
                if isinstance(exc, ValueError):  # the pipeline's own checks of its arguments
                    raise RequestError(f"the pipeline refused the request: {exc}") from None
                raise
            finally:
                with self._jobs_lock:
                    if self._jobs.get(session or "") is cancel:
                        del self._jobs[session or ""]

    def _run(self, request: Request, compare: bool, cancel: threading.Event) -> Result:
        pipe, family = self.load(request.model)
        settings = settings_for(request, family)
        check_geometry(request, pipe)
        dtype = getattr(getattr(pipe, "transformer", None), "dtype", torch.float32)
        check_memory(
            request, available_bytes(self.device), torch.empty((), dtype=dtype).element_size(), compare
        )
        if cancel.is_set():
            raise Cancelled(0, request.steps)
        folder = self._job_dir()
        patterns_path = folder / "patterns.safetensors"
        method = {} if settings.preset else {"method": settings.method}
        accel = wrapped.wrap(
            pipe, settings.preset, **method, **settings.knobs, save_patterns=str(patterns_path)
        )
        call = request.call_kwargs()
        if wrapped.source_kind(request.model)[0] == "embedded":
            call["guidance_scale"] = GUIDANCE
        call.update(_cancel_callback(pipe, cancel, request.steps))
        try:
            if compare:
                cmp = accel.compare(seed=request.seed, **call)
                output, seconds, stats = cmp.accelerated, cmp.seconds, cmp.stats
            else:
                output, seconds = quality.timed(quality.render_output, accel, seed=request.seed, **call)
                stats = accel.stats()
        finally:
            dit_accel.remove(pipe)
        records = stats.records
        density = quality.attention_density(records)
        patterns = load_patterns(patterns_path) if patterns_path.is_file() else None
        result = Result(
            request=request,
            device=self.device,
            family=family,
            settings=_describe(settings),
            video=write_video(quality.as_frames(output[:1]), folder / "accelerated.mp4"),
            seconds=seconds,
            view=RunView(records, patterns, _describe(settings)),
            **density,
        )
        if compare:
            result.dense_video = write_video(quality.as_frames(cmp.dense[:1]), folder / "dense.mp4")
            result.seconds_dense = cmp.seconds_dense
            result.psnr, result.ssim = cmp.psnr, cmp.ssim
            result.psnr_mean, result.ssim_mean = cmp.psnr_mean, cmp.ssim_mean
        return result


def _cancel_callback(pipe, cancel: threading.Event, steps: int) -> dict:
    """``callback_on_step_end`` that raises :class:`Cancelled` once ``cancel`` is set (pipelines without the
    argument cannot be stopped mid-render)."""
    import inspect

    if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        return {}

    def on_step_end(_pipe, i, _t, _kwargs):
        if cancel.is_set():
            raise Cancelled(i + 1, steps)
        return {}

    return {"callback_on_step_end": on_step_end}
