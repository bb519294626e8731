"""Wrapped pipelines: any supported diffusers pipeline (video or image) with dit_accel installed by preset.

    from dit_accel import pipelines

    pipe = pipelines.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", preset="balanced",
                                     torch_dtype=torch.bfloat16, device="cuda")
    video = pipe(prompt="a red fox running through snow", num_inference_steps=50).frames
    pipe.compile()                                 # optional: torch.compile the transformer blocks
    pipe.configure(preset="fast")                  # or pipe.configure(density=0.08): knobs between calls
    result = pipe.compare(prompt="a red fox running through snow", seed=0)
    print(result.summary())                        # PSNR/SSIM per frame, times, speedup, density
    stock = pipe.remove()                          # the stock pipeline, exactly as before

``wrap(pipe, preset=..., **knobs)`` does the same for a pipeline already built. The wrapper is a thin layer on
the public API: :func:`dit_accel.apply` with the preset's method and knobs (re-applied, never stacked, when
they change) and :func:`dit_accel.remove`; calls go to the pipeline unchanged; attributes it does not define
(``to``, ``scheduler``, ``enable_model_cpu_offload``, ...) are the pipeline's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dit_accel
from dit_accel.api import _transformers, get_handle
from dit_accel.processors import SUPPORTED, family_for

from . import cpu_vae, quality
from .presets import FAMILIES, Settings, merged_knobs, resolve

__all__ = [
    "EMBEDDED",
    "AcceleratedPipeline",
    "Comparison",
    "compile_blocks",
    "family_of",
    "family_of_source",
    "from_pretrained",
    "load_pipeline",
    "source_kind",
    "supported_text",
    "wrap",
]

EMBEDDED = "embedded"
_TINY_MANIFEST = "tiny_video.json"


def supported_text() -> str:
    """The supported families and their diffusers transformer classes, for error messages."""
    by_family: dict[str, list[str]] = {}
    for cls, fam in SUPPORTED.items():
        by_family.setdefault(fam, []).append(cls)
    return "; ".join(f"{fam} ({FAMILIES.get(fam, '?')}: {', '.join(c)})" for fam, c in by_family.items())


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"{what}. dit_accel.pipelines wraps pipelines whose transformer is supported: {supported_text()}"
    )


def family_of(pipe) -> str:
    """The family name of a pipeline's transformer(s) (``"wan"``, ``"flux"``, ...).

    Raises:
        ValueError: no transformer component, or one dit_accel does not support (the message names the
            supported families and classes), or transformers of different families.
    """
    if not hasattr(pipe, "components"):
        raise TypeError(f"expected a diffusers pipeline, got {type(pipe).__name__}")
    found = [
        (name, module)
        for name, module in pipe.components.items()
        if name.startswith("transformer") and isinstance(module, torch.nn.Module)
    ]
    if not found:
        raise _unsupported(f"{type(pipe).__name__} has no transformer component (a UNet pipeline?)")
    families = set()
    for name, module in found:
        try:
            families.add(family_for(module).name)
        except ValueError:
            raise _unsupported(f"{type(pipe).__name__}.{name} is a {type(module).__name__}") from None
    if len(families) != 1:
        raise ValueError(f"{type(pipe).__name__} mixes transformer families {sorted(families)}")
    (family,) = families
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} has no presets yet; families with presets: {list(FAMILIES)}")
    return family


def _family_of_class(name: str) -> str | None:
    """Family of a diffusers class name (through its MRO, as dit_accel.processors.family_for does); None when
    diffusers has no class of that name."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        return None
    for base in cls.__mro__:
        if base.__name__ in SUPPORTED:
            return SUPPORTED[base.__name__]
    raise _unsupported(f"the pipeline's transformer is a {name}")


def family_of_source(source: str | os.PathLike | None) -> str | None:
    """The family of what :func:`load_pipeline` would load, read without loading it: "wan" for the embedded
    model, a local pipeline folder's transformer class from its ``model_index.json``, None for a hub id.

    Raises:
        ValueError: a local folder that is not a pipeline, or whose transformer is not supported.
    """
    kind, path = source_kind(source)
    if kind == "embedded":
        return "wan"
    if kind == "hub":
        return None
    index = json.loads((path / "model_index.json").read_text())
    classes = [
        v[1]
        for k, v in index.items()
        if k.startswith("transformer") and isinstance(v, (list, tuple)) and len(v) == 2 and v[1]
    ]
    if not classes:
        raise _unsupported(f"{path} ({index.get('_class_name', 'a pipeline')}) has no transformer component")
    families = {_family_of_class(c) for c in classes}
    families.discard(None)
    if len(families) > 1:
        raise ValueError(f"{path} mixes transformer families {sorted(families)}")
    return families.pop() if families else None


def source_kind(source) -> tuple[str, Path | None]:
    """("embedded", weights folder or None) | ("folder", path) | ("hub", None) for a :func:`load_pipeline`
    source; a ValueError for a local path that is not a pipeline."""
    if source is None or str(source) == EMBEDDED:
        return "embedded", None
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / _TINY_MANIFEST).is_file():
            return "embedded", path
        if (path / "model_index.json").is_file():
            return "folder", path
        raise ValueError(
            f"{path} is neither a diffusers pipeline folder (no model_index.json; write one with "
            f"pipe.save_pretrained) nor the embedded model's weights ({_TINY_MANIFEST})"
        )
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ValueError(f"no pipeline folder at {text}")
    return "hub", None


def load_pipeline(
    source: str | os.PathLike | None = EMBEDDED,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    fast_cpu_vae: bool = True,
    **load_kwargs,
):
    """Load a stock pipeline: the embedded tiny model, a local folder written by ``save_pretrained``, or a
    hub id (passed to diffusers as it is).

    Args:
        source: ``"embedded"`` (or None), a weights folder of the embedded model, a diffusers pipeline folder,
            or a hub id.
        torch_dtype: dtype of the pipeline's modules (diffusers' default when None; for the embedded model
            float32 on CPU, bfloat16 elsewhere).
        device: where to put the pipeline (left where diffusers loads it when None; the embedded model: CPU).
        fast_cpu_vae: route the VAE's 3D convolutions and Wan RMS norms to fast CPU kernels when it runs on
            the CPU in float32 (:mod:`dit_accel.pipelines.cpu_vae`; the embedded model decodes a
            49 x 192 x 256 clip 5x faster on 2 cores). Stock and accelerated renders of the pipeline share it.
        load_kwargs: more arguments of ``DiffusionPipeline.from_pretrained`` (``variant``, ``revision``, ...);
            for the embedded model only ``weights_dir`` (default: the package's weights).
    """
    kind, path = source_kind(source)
    if kind == "embedded":
        from .tiny_video import model

        weights_dir = load_kwargs.pop("weights_dir", path)
        if load_kwargs:
            raise ValueError(f"the embedded model takes only weights_dir, got {sorted(load_kwargs)}")
        return model.load_tiny_video_pipeline(
            device=device or "cpu", dtype=torch_dtype, weights_dir=weights_dir, fast_cpu_vae=fast_cpu_vae
        )
    from diffusers import DiffusionPipeline

    if torch_dtype is not None:
        load_kwargs["dtype"] = torch_dtype  # diffusers 0.42 name of torch_dtype
    pipe = DiffusionPipeline.from_pretrained(str(path) if path is not None else str(source), **load_kwargs)
    if device is not None:
        pipe.to(device)
    if fast_cpu_vae:
        cpu_vae.speed_up_pipeline(pipe)
    return pipe


def _block_lists(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer: the classes its ``_repeated_blocks`` names (diffusers' regional
    compilation), else every element of a child ``ModuleList`` of two or more modules of one class."""
    named = getattr(model, "_repeated_blocks", None) or ()
    if named:
        return [m for m in model.modules() if type(m).__name__ in named]
    blocks = []
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1:
            blocks.extend(child)
    return blocks


def compile_blocks(target, **compile_kwargs) -> int:
    """Regional ``torch.compile`` of a pipeline's transformer(s) (or of one transformer): each repeated block
    is compiled on its own (``nn.Module.compile``), blocks of one class sharing a graph.

    This is diffusers' ``compile_repeated_blocks``, extended to transformers that declare no repeated blocks
    (CogVideoX, Mochi, SD3 and PixArt in diffusers 0.42: the elements of their block lists). dit_accel's
    processors compile with no graph break and no recompilation across steps (docs/integration.md), before or
    after ``wrap``/``dit_accel.apply``; the compilation belongs to the pipeline and stays after ``remove``
    (the blocks then run stock attention). The first call at a geometry pays for compiling. Blocks compiled
    before are left alone, so calling it again does nothing.

    Args:
        target: a diffusers pipeline or transformer.
        compile_kwargs: ``torch.compile`` arguments (``mode``, ``fullgraph``, ``dynamic``, ``backend``).

    Returns:
        the number of blocks this call compiled.

    Raises:
        ValueError: a transformer with no repeated blocks to compile.
    """
    count = 0
    for name, model in _transformers(target):
        blocks = _block_lists(model)
        if not blocks:
            raise ValueError(f"{name} ({type(model).__name__}) has no repeated blocks to compile")
        for block in blocks:
            if getattr(block, "_compiled_call_impl", None) is None:
                block.compile(**compile_kwargs)
                count += 1
    return count


def from_pretrained(
    source: str | os.PathLike | None = EMBEDDED,
    preset: str | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    load_kwargs: dict | None = None,
    compile: bool = False,
    **knobs,
) -> AcceleratedPipeline:
    """Load a pipeline (see :func:`load_pipeline`) and wrap it (see :func:`wrap`); with ``compile=True`` also
    compile its transformer blocks (:func:`compile_blocks`).

    The preset and knobs are checked before anything is loaded (for the embedded model and local folders
    also against the family), so a typo costs no loading time.

    Example:
        pipe = dit_accel.pipelines.from_pretrained("embedded", preset="quality")
        frames = pipe(prompt="a large red circle moving right on a black background",
                      num_frames=17, height=96, width=128, num_inference_steps=10).frames
    """
    resolve(family_of_source(source), preset, knobs)
    pipe = load_pipeline(source, torch_dtype=torch_dtype, device=device, **(load_kwargs or {}))
    accel = wrap(pipe, preset, **knobs)
    return accel.compile() if compile else accel


def wrap(pipe, preset: str | None = None, **knobs) -> AcceleratedPipeline:
    """Install dit_accel on ``pipe`` by preset, knobs on top; returns the :class:`AcceleratedPipeline`.

    Args:
        pipe: a diffusers pipeline of a supported family (Wan 2.1/2.2 T2V and I2V, HunyuanVideo, CogVideoX,
            LTX, Mochi, Flux, SD3, PixArt, Qwen-Image; the embedded model is a WanPipeline).
        preset: "dense", "quality", "balanced" or "fast" (see ``dit_accel.pipelines.presets`` and
            docs/pipelines.md); default "balanced", or none when ``method`` is given.
        knobs: override the preset's knobs: method options (``sparsity=0.85``) and
            :class:`dit_accel.SparseAttentionConfig` fields (``dense_steps=0.3``, ``block_q=64``);
            ``method=`` picks a method instead of a preset.

    Raises:
        ValueError: an unsupported pipeline (the message names the supported families), an unknown preset,
            a knob the method does not take (the message names its knobs) or a bad value.
    """
    if isinstance(pipe, AcceleratedPipeline):  # re-wrapping replaces the earlier installation
        pipe = pipe.pipe
    family = family_of(pipe)
    explicit = dict(knobs)
    settings = resolve(family, preset, explicit)
    return AcceleratedPipeline(pipe, family, preset, explicit, settings)


@dataclass
class Comparison:
    """Dense (stock attention) and accelerated renders of the same call and seed, compared.

    Attributes:
        dense, accelerated: the pipeline's ``output_type="np"`` outputs (video [B, F, H, W, 3], image
            [B, H, W, 3]).
        psnr, ssim: per frame (every frame of every output, in order), accelerated against dense.
        psnr_mean: inf when every frame is identical; ssim_mean.
        seconds_dense, seconds: wall time of each render (CUDA-synchronised); the accelerated render's
            first call includes compiling dit_accel's kernels.
        speedup: seconds_dense / seconds.
        density: mean fraction of blocks computed by the sparse attention calls (1.0 when there were none);
            overall_density counts the dense calls as 1.0; plan_density averages only the calls that ran
            nothing but a plan's blocks (no search or refresh; None when there were none).
        sparse_calls, calls: attention calls of the accelerated render.
        settings: the method and knobs compared; family.
        stats: the accelerated render's :class:`dit_accel.AttentionStats`.
    """

    dense: np.ndarray
    accelerated: np.ndarray
    psnr: list[float]
    ssim: list[float]
    psnr_mean: float
    ssim_mean: float
    seconds_dense: float
    seconds: float
    density: float
    plan_density: float | None
    overall_density: float
    sparse_calls: int
    calls: int
    settings: Settings
    family: str
    stats: Any = field(repr=False, default=None)

    @property
    def speedup(self) -> float:
        return self.seconds_dense / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"{self.settings.describe()} vs dense: PSNR {self.psnr_mean:.2f} dB (worst frame "
            f"{min(self.psnr):.2f}), SSIM {self.ssim_mean:.4f}; {self.seconds_dense:.2f} s dense, "
            f"{self.seconds:.2f} s accelerated, speedup {self.speedup:.2f}x; density {self.density:.3f} over "
            f"{self.sparse_calls} sparse of {self.calls} attention calls (overall {self.overall_density:.3f})"
        )

    def side_by_side(self, gap: int = 4) -> np.ndarray:
        """[N, H, 2W + gap, 3] frames: dense on the left, accelerated on the right, a white gap between."""
        a, b = quality.as_frames(self.dense), quality.as_frames(self.accelerated)
        bar = np.ones((*a.shape[:2], gap, a.shape[3]), dtype=a.dtype)
        return np.concatenate([a, bar, b], axis=2)


class AcceleratedPipeline:
    """A diffusers pipeline with dit_accel installed from a preset (see :func:`wrap`).

    Attributes:
        pipe: the pipeline (its transformers carry dit_accel's processors while wrapped).
        family: the family name of its transformer(s); kind: "video" or "image".
        settings: the :class:`Settings` applied (preset, method, knobs).
        handle: the :class:`dit_accel.SparseAttentionHandle` of the installation.
    """

    def __init__(self, pipe, family: str, preset: str | None, knobs: dict, settings: Settings):
        self.pipe = pipe
        self.family = family
        self.kind = FAMILIES[family]
        self._preset = preset
        self._knobs = dict(knobs)
        self.settings = settings
        self.handle = None
        self._removed = False
        self._install()

    def _install(self) -> None:
        s = self.settings
        self.handle = dit_accel.apply(self.pipe, method=s.method, **s.knobs)

    def _ensure_installed(self) -> None:
        if self._removed:
            raise RuntimeError(
                "this wrapper was removed: call the stock pipeline remove() returned, or configure() to "
                "accelerate it again"
            )
        if get_handle(self.pipe) is not self.handle:  # removed or replaced from outside
            self._install()

    @property
    def preset(self) -> str | None:
        return self.settings.preset

    @property
    def method(self) -> str:
        return self.settings.method_name

    @property
    def knobs(self) -> dict:
        return dict(self.settings.knobs)

    def __call__(self, *args, **kwargs):
        """Call the pipeline with its own arguments, accelerated. When the pipeline's installation was
        removed or replaced from outside (``dit_accel.remove``, another wrapper), this wrapper's settings are
        applied again first: the wrapper called is the one that runs."""
        self._ensure_installed()
        return self.pipe(*args, **kwargs)

    def configure(self, preset: str | None = None, **knobs) -> AcceleratedPipeline:
        """Change the preset or knobs for the next calls (dit_accel is re-applied, never stacked).

        ``configure(preset="fast")`` starts over from that preset (earlier knob overrides are dropped);
        ``configure(sparsity=0.85)`` keeps the preset and adds to the overrides; ``configure(method=...)``
        with a different method starts over from that method and these knobs. Nothing changes when the
        new settings are invalid (ValueError). Returns self.
        """
        if preset is not None:
            new_preset, new_knobs = preset, dict(knobs)
        elif "method" in knobs and knobs["method"] != self.settings.method:
            new_preset, new_knobs = None, dict(knobs)
        else:
            new_preset, new_knobs = self._preset, merged_knobs(self._knobs, knobs)
        settings = resolve(self.family, new_preset, new_knobs)
        previous = (self._preset, self._knobs, self.settings, self._removed)
        self._preset, self._knobs, self.settings = new_preset, new_knobs, settings
        self._removed = False
        try:
            self._install()
        except Exception:
            self._preset, self._knobs, self.settings, self._removed = previous
            if not self._removed:
                self._install()
            raise
        return self

    def compile(self, **compile_kwargs) -> AcceleratedPipeline:
        """Compile the pipeline's transformer blocks (:func:`compile_blocks`; ``torch.compile`` arguments
        pass through). On Wan-1.3B 480p the balanced preset went from 1.63x to 1.93x of eager stock with it
        (docs/e2e.md). It stays compiled across :meth:`configure` and
        after :meth:`remove`. Returns self."""
        compile_blocks(self.pipe, **compile_kwargs)
        return self

    def stats(self):
        """The :class:`dit_accel.AttentionStats` of the latest call (per attention call: step, layer, kind,
        density, time)."""
        self._ensure_installed()
        return self.handle.stats()

    def compare(self, *args, seed: int = 0, **kwargs) -> Comparison:
        """Render the same call dense (stock attention) and accelerated with the same seed, and compare.

        Args:
            args, kwargs: the pipeline's own arguments (``prompt``, ``num_inference_steps``, ...), except
                ``generator`` (each render gets a CPU generator seeded with ``seed``) and ``output_type``
                (decoded frames, "np").
            seed: the seed of both renders.

        Returns:
            a :class:`Comparison`; the pipeline stays accelerated and :meth:`stats` describes the
            accelerated render.
        """
        if "generator" in kwargs:
            raise ValueError("compare seeds both renders itself: pass seed=..., not generator=")
        if kwargs.pop("output_type", "np") != "np":
            raise ValueError('compare compares decoded frames: output_type must be "np" (the default)')
        self._ensure_installed()
        dit_accel.remove(self.pipe)
        try:
            dense, seconds_dense = quality.timed(quality.render_output, self.pipe, *args, seed=seed, **kwargs)
        finally:
            self._install()
        accelerated, seconds = quality.timed(quality.render_output, self.pipe, *args, seed=seed, **kwargs)
        stats = self.handle.stats()
        metrics = quality.frame_metrics(quality.as_frames(dense), quality.as_frames(accelerated))
        density = quality.attention_density(stats.records)
        return Comparison(
            dense=dense,
            accelerated=accelerated,
            **metrics,
            seconds_dense=seconds_dense,
            seconds=seconds,
            **density,
            settings=self.settings,
            family=self.family,
            stats=stats,
        )

    def remove(self):
        """Restore the stock pipeline (processors and hooks exactly as before) and return it."""
        dit_accel.remove(self.pipe)
        self.handle = None
        self._removed = True
        return self.pipe

    unwrap = remove

    def __getattr__(self, name):
        if name.startswith("__") or "pipe" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["pipe"], name)

    def __repr__(self) -> str:
        state = "removed" if self._removed else self.settings.describe()
        return f"AcceleratedPipeline({type(self.pipe).__name__}, {self.family}, {state})"
