"""What a page request asks for, checked before anything renders.

A request is the page's fields as they arrive (from the browser or ``gradio_client``): prompt, model, preset,
the advanced knobs, seed, steps and clip geometry. :func:`parse_request` checks types and ranges;
:func:`settings_for` resolves the preset and knobs for the model's family with the presets module's own
checks (an unknown knob names the method's knobs); :func:`check_geometry` and :func:`check_memory` check the
clip against the loaded pipeline and the device. Each refusal is a :class:`RequestError` whose message is
what the page shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dit_accel.methods import method_names
from dit_accel.pipelines import presets
from dit_accel.pipelines.quality import parse_value

__all__ = [
    "BASES",
    "DEFAULT_BASE",
    "PRESET_METHOD",
    "Request",
    "RequestError",
    "check_geometry",
    "check_memory",
    "estimate_bytes",
    "geometry_rules",
    "parse_knob_text",
    "parse_request",
    "settings_for",
]

# The method field's value that keeps the preset's method, and the base field's "not given".
PRESET_METHOD = "preset's"
DEFAULT_BASE = "default"
BASES = ("window", "radial", "adaspa")
# Knobs the page sets itself: the method has its own field, and the pattern file is the demo's.
_RESERVED = {
    "method": "pick the method in the method field",
    "patterns": "the demo renders without saved patterns",
    "save_patterns": "the demo saves each run's patterns itself, for the pattern picture",
}
MAX_STEPS = 1000


class RequestError(ValueError):
    """A request the demo refuses; the message is written for the page."""


@dataclass(frozen=True)
class Request:
    """A checked request.

    Attributes:
        prompt: the text prompt (stripped, not empty).
        model: "embedded" or a local pipeline folder.
        preset: a preset name; method: a method name, or None for the preset's.
        knobs: method options and config fields from the advanced panel (no ``method``).
        seed, steps, frames, height, width: the render's call.
    """

    prompt: str
    model: str
    preset: str
    method: str | None
    knobs: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    steps: int = 10
    frames: int = 17
    height: int = 96
    width: int = 128

    def call_kwargs(self) -> dict:
        """The pipeline's own call arguments (the seed goes to the generator)."""
        return {
            "prompt": self.prompt,
            "num_frames": self.frames,
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.steps,
        }

    @property
    def geometry(self) -> str:
        return f"{self.frames} frames × {self.height} × {self.width}"


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets: ``"a=1, b=(0, 1)"`` -> ``["a=1", "b=(0, 1)"]``."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_knob_text(text: str | None) -> dict:
    """``"tau=0.9, dense_layers=(0,)"`` -> ``{"tau": 0.9, "dense_layers": (0,)}``; values are Python
    literals where they parse, else strings.

    Raises:
        RequestError: an item that is not ``key=value``, a key given twice, or a knob the page sets itself.
    """
    knobs: dict = {}
    for item in _split_top(text or ""):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise RequestError(f"more knobs: expected key=value items separated by commas, got {item!r}")
        if key in _RESERVED:
            raise RequestError(f"more knobs: {key!r} cannot be set here: {_RESERVED[key]}")
        if key in knobs:
            raise RequestError(f"more knobs: {key!r} is given twice")
        knobs[key] = parse_value(value.strip())
    return knobs


def _whole(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum]; a RequestError naming the field otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RequestError(f"{name}: give a number")
    if isinstance(value, bool):
        raise RequestError(f"{name}: expected a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name}: expected a whole number, got {value!r}") from None
    if not math.isfinite(number) or not number.is_integer():
        raise RequestError(f"{name}: expected a whole number, got {value!r}")
    number = int(number)
    if number < minimum or (maximum is not None and number > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise RequestError(f"{name}: must be at least {minimum}{upper}, got {number}")
    return number


def _optional_number(name: str, value) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RequestError(f"{name}: expected a finite number, got {value!r}")
    return number


def _dense_steps(value) -> int | float | None:
    number = _optional_number("dense steps", value)
    if number is None:
        return None
    if number >= 1 and number.is_integer():
        return int(number)
    if 0 <= number < 1:
        return int(number) if number == 0 else number
    raise RequestError(
        f"dense steps: a count of steps (a whole number) or a fraction of the steps in [0, 1), got {value!r}"
    )


def parse_request(
    prompt,
    model,
    preset,
    method=PRESET_METHOD,
    base=DEFAULT_BASE,
    sparsity=None,
    density=None,
    dense_steps=None,
    refresh_every=None,
    more_knobs="",
    seed=0,
    steps=10,
    frames=17,
    height=96,
    width=128,
) -> Request:
    """Check the page's fields (types, ranges, names) and gather the knobs; what depends on the model is
    checked by :func:`settings_for` and :func:`check_geometry`.

    Args:
        prompt: text; model: "embedded" or a local pipeline folder; preset: a preset name;
        method: a method name or :data:`PRESET_METHOD`; base: rettention's base pattern or
        :data:`DEFAULT_BASE`; sparsity, density, dense_steps, refresh_every: numbers or None (not given);
        more_knobs: ``key=value, ...`` of any other knob; seed, steps, frames, height, width: whole numbers.

    Raises:
        RequestError: the first field that cannot work.
    """
    if prompt is not None and not isinstance(prompt, str):
        raise RequestError(f"prompt: expected text, got {type(prompt).__name__}")
    prompt = (prompt or "").strip()
    if not prompt:
        raise RequestError(
            "Type a prompt first (the examples below the prompt box are ones the embedded model knows)."
        )
    model = (model or "").strip() or "embedded"
    names = presets.all_preset_names()
    if preset not in names:
        raise RequestError(f"preset: unknown preset {preset!r}; presets: {', '.join(names)}")
    if method in (None, "", PRESET_METHOD):
        method = None
    elif method not in method_names():
        raise RequestError(f"method: unknown method {method!r}; methods: {', '.join(method_names())}")
    knobs = parse_knob_text(more_knobs)
    given: dict[str, Any] = {}
    if base not in (None, "", DEFAULT_BASE):
        if base not in BASES:
            raise RequestError(f"base pattern: unknown base {base!r}; bases: {', '.join(BASES)}")
        given["base"] = base
    for name, value in (("sparsity", sparsity), ("density", density)):
        number = _optional_number(name, value)
        if number is not None:
            given[name] = number
    steps_spec = _dense_steps(dense_steps)
    if steps_spec is not None:
        given["dense_steps"] = steps_spec
    if refresh_every is not None and not (isinstance(refresh_every, str) and not refresh_every.strip()):
        given["refresh_every"] = _whole("refresh period", refresh_every, 1)
    twice = sorted(set(given) & set(knobs))
    if twice:
        raise RequestError(f"more knobs: {', '.join(twice)} already has its own field above")
    return Request(
        prompt=prompt,
        model=model,
        preset=preset,
        method=method,
        knobs={**given, **knobs},
        seed=_whole("seed", seed, 0, 2**63 - 1),
        steps=_whole("steps", steps, 1, MAX_STEPS),
        frames=_whole("frames", frames, 1),
        height=_whole("height", height, 1),
        width=_whole("width", width, 1),
    )


def settings_for(request: Request, family: str) -> presets.Settings:
    """The preset's settings with the request's knobs on top, checked for ``family``
    (:func:`dit_accel.pipelines.presets.resolve`). A method other than the preset's replaces the preset.

    Raises:
        RequestError: an unknown knob (the message names the method's knobs) or a value the method refuses.
    """
    knobs = dict(request.knobs)
    try:
        if request.method is None or request.method == presets.get_preset(family, request.preset).method:
            return presets.resolve(family, request.preset, knobs)
        return presets.resolve(family, None, {"method": request.method, **knobs})
    except ValueError as exc:
        raise RequestError(str(exc)) from None


def _patch(transformer) -> int:
    size = getattr(getattr(transformer, "config", None), "patch_size", None) or 1
    return int(size[-1] if isinstance(size, (tuple, list)) else size)


def geometry_rules(pipe) -> tuple[int, int]:
    """(temporal factor t, spatial multiple m) of a video pipeline: frames must be k·t + 1, height and width
    multiples of m (the VAE's spatial factor times the transformer's patch). The embedded model: (4, 16)."""
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", None) or 1)
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 8
    return temporal, max(int(spatial) * _patch(getattr(pipe, "transformer", None)), 8)


def check_geometry(request: Request, pipe) -> None:
    """Frames k·t + 1 and sizes the model can take (:func:`geometry_rules`).

    Raises:
        RequestError: naming the nearest sizes that work.
    """
    temporal, multiple = geometry_rules(pipe)
    if temporal > 1 and (request.frames - 1) % temporal:
        k = (request.frames - 1) // temporal
        raise RequestError(
            f"frames: this model needs {temporal}k + 1 frames (e.g. {temporal * k + 1} or "
            f"{temporal * (k + 1) + 1}), got {request.frames}"
        )
    for name in ("height", "width"):
        value = getattr(request, name)
        if value % multiple:
            lower = max(value // multiple * multiple, multiple)
            raise RequestError(
                f"{name}: this model needs a multiple of {multiple} (e.g. {lower} or {lower + multiple}), "
                f"got {value}"
            )


# Peak memory of a render beyond the loaded model, measured on the embedded model in float32 on CPU (peak RSS
# over the loaded model): 5x96x128 0.10 GiB, 17x96x128 0.20, 17x192x256 0.65, 49x192x256 0.64, 5x384x512
# 0.73, 5x768x1024 2.4.
# The VAE decodes a few frames at a time, so the peak follows the area of one frame more than the frame count.
# The constants below cover every measurement (up to 1.7x over at the largest); the per-pixel part is scaled
# by the dtype's size (bfloat16 on a GPU).
_BASE_BYTES = 400 * 2**20
_BYTES_PER_FRAME_PIXEL = 4_500
_BYTES_PER_CLIP_PIXEL = 64


def estimate_bytes(request: Request, dtype_bytes: int = 4) -> int:
    """Estimated peak bytes a render of ``request`` needs beyond the loaded model (see the constants)."""
    area = request.height * request.width
    per_frame = _BYTES_PER_FRAME_PIXEL * area * dtype_bytes // 4
    return int(_BASE_BYTES + per_frame + _BYTES_PER_CLIP_PIXEL * area * request.frames)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(
    request: Request, available: int | None, dtype_bytes: int = 4, compare: bool = False
) -> None:
    """Refuse a request whose estimated peak (:func:`estimate_bytes`; a comparison keeps both clips) exceeds
    ``available`` bytes (None: unknown, nothing refused).

    Raises:
        RequestError: naming the estimate and what is available.
    """
    if available is None:
        return
    need = estimate_bytes(request, dtype_bytes)
    if compare:
        need += _BYTES_PER_CLIP_PIXEL * request.height * request.width * request.frames
    if need > available:
        raise RequestError(
            f"{request.geometry} will not fit in memory: it needs about {_gib(need)} and "
            f"{_gib(available)} is free. Use fewer frames or a smaller size."
        )
