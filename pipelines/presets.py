"""Presets: per model family, a name ("dense", "quality", "balanced", "fast") for a method plus knobs, with
the numbers measured for it. This module is the one table of them; docs/pipelines.md prints it
(:func:`markdown_table`, checked by a test) and ``dit-accel presets`` lists it.

Each row carries what was measured for exactly its method and knobs, or nothing:

- speed: the speedup over stock diffusers attention at a real geometry of the family, from a GPU benchmark's
  JSON (the file and the key are named, and a test reads them back);
- quality: PSNR / SSIM against dense on the embedded trained model (a stock WanPipeline) from the quality
  harness (``docs/quality_tiny.json`` at 30 steps, or a results file the row names with its steps and prompt
  count; the row whose knobs resolve to the same method configuration).

A row without a speed measurement at its family's geometry is *untuned* for that family and says so. Knobs of
such rows are chosen by analogy (see docs/pipelines.md); no number is given for them.

Adding a row, e.g. a rettention preset once it is measured, is one more :class:`Preset` line in
:data:`_ROWS`; its measurements name their sources the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dit_accel import SparseAttentionConfig
from dit_accel.methods import SparseMethod, create_method, method_knobs, method_names
from dit_accel.processors import SUPPORTED

__all__ = [
    "FAMILIES",
    "PRESET_NAMES",
    "Preset",
    "Quality",
    "Settings",
    "Source",
    "Speed",
    "check_knobs",
    "config_fields",
    "family_presets",
    "get_preset",
    "markdown_table",
    "merged_knobs",
    "resolve",
    "resolved_knobs",
    "table",
]


def _family(name: str):
    """The :class:`dit_accel.processors.Family` named ``name`` (its module in dit_accel.processors)."""
    return importlib.import_module(f"dit_accel.processors.{name}").FAMILY


# Every supported family, in dit_accel.processors' order, and what its pipelines return: "video" pipelines
# return ``.frames``, "image" pipelines ``.images`` (Family.video).
FAMILIES: dict[str, str] = {
    name: "video" if _family(name).video else "image" for name in dict.fromkeys(SUPPORTED.values())
}

# The presets every family has, in the order they are listed; a family may add more after them.
PRESET_NAMES = ("dense", "quality", "balanced", "fast")


@dataclass(frozen=True)
class Source:
    """Where a number comes from: a JSON file of the repository and a key path in it.

    ``key`` is "/"-separated; a part ``name[field=value]`` selects the list item of ``name`` whose ``field``
    equals ``value`` (``rows[method=radial]/psnr``); ``name[f=a,g=b]`` needs every condition; a value with
    commas is double-quoted (``rows[method="adaspa:sparsity=0.9,tau=0.5"]``).
    """

    path: str
    key: str

    def read(self, root: Path | str) -> float:
        """The value at ``key`` in ``root / path``."""
        node: Any = json.loads((Path(root) / self.path).read_text())
        for part in self.key.split("/"):
            name, _, selector = part.partition("[")
            if name:
                node = node[name]
            if selector:
                conditions = [
                    (f, v[1:-1] if v.startswith('"') else v)
                    for f, v in re.findall(r'(\w+)=("[^"]*"|[^,]*)', selector.rstrip("]"))
                ]
                matches = [item for item in node if all(str(item.get(f)) == v for f, v in conditions)]
                if len(matches) != 1:
                    raise KeyError(
                        f"{self.path}: {len(matches)} items match {selector.rstrip(']')!r} at {part!r}"
                    )
                node = matches[0]
        return float(node)

    def __str__(self) -> str:
        return f"{self.path} {self.key}"


@dataclass(frozen=True)
class Speed:
    """A measured speedup over stock attention (higher is faster).

    Attributes:
        speedup: the value as printed (rounded to 2 decimals); a test reads it back from ``source``.
        geometry: the model and clip it was measured at.
        what: how it was measured, starting with the GPU ("H200 bf16, ...").
        source: the measured value (a speedup), or with ``baseline`` the preset's time.
        baseline: the stock time, when the speedup is ``baseline / source``.
    """

    speedup: float
    geometry: str
    what: str
    source: Source
    baseline: Source | None = None

    @property
    def gpu(self) -> str:
        return self.what.split(" ", 1)[0]

    def measured(self, root: Path | str) -> float:
        value = self.source.read(root)
        return self.baseline.read(root) / value if self.baseline is not None else value


@dataclass(frozen=True)
class Quality:
    """Output against dense with the same seed on the embedded trained model (docs/quality_tiny.md).

    Attributes:
        psnr: mean PSNR in dB over every frame of every prompt (2 decimals).
        ssim: mean SSIM (3 decimals).
        density: mean fraction of blocks computed by the sparse attention calls (3 decimals).
        row: the ``method`` label of the row in the quality harness's JSON at ``path``.
        steps: denoising steps of the renders (the harness's default is 30; the speed is measured at 50).
        prompts: held-out prompts averaged over.
    """

    psnr: float
    ssim: float
    density: float
    row: str
    path: str = "docs/quality_tiny.json"
    steps: int = 30
    prompts: int = 24


@dataclass(frozen=True)
class Preset:
    """One row of the table: a family's preset name -> method and knobs, and what was measured for it.

    Attributes:
        family: the family name (``FAMILIES``).
        name: the preset name.
        method: a name of :func:`dit_accel.methods.method_names`.
        knobs: method options and :class:`dit_accel.SparseAttentionConfig` fields.
        speed: measurements at the family's real geometries (empty: untuned for the family).
        quality: the embedded model's numbers for the same method configuration, or None.
        note: why these knobs, or what the numbers do not cover.
    """

    family: str
    name: str
    method: str
    knobs: Mapping[str, Any] = field(default_factory=dict)
    speed: tuple[Speed, ...] = ()
    quality: Quality | None = None
    note: str = ""

    @property
    def tuned(self) -> bool:
        """Measured at this family's geometry (speed); the dense reference needs no measurement."""
        return self.method == "dense" or bool(self.speed)

    @property
    def status(self) -> str:
        if self.method == "dense":
            return "reference"
        if self.speed:
            return "measured"
        return f"untuned for {self.family}"

    def knob_text(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.knobs.items()) or "-"


# ---------------------------------------------------------------------------------------------- the table

_E2E13 = "benchmarks/results/e2e_wan1.3b_480p_81f_nvidia_h200.json"
# The balanced preset: re-ttention on a 5% per-frame window, 10% dense warm-up, refreshes at 10, 20, 40,
# 60 and 80% of the run (docs/rettention.md), its bench_e2e row and quality row. Its refreshes are fractions
# of the run: at 50 steps 5, 10, 20, 30 and 40; at 30 or 10 steps the same shape. History: a refresh every 10
# steps (5, 15, 25, 35, 45) kept 29.93 dB on 24 prompts, under DESIGN.md's 30 dB; six refreshes (5, 10, 15,
# 25, 35, 45) kept 32.28 dB at 1.79x (Wan-1.3B, under its 1.8x); these five keep 31.1 dB on all 24, at
# 1.81x (2.32x with fuse_blocks).
_LEAN: dict[str, Any] = {"density": 0.05, "dense_steps": 0.1, "refresh_at": (0.2, 0.4, 0.6, 0.8)}
_LEAN_ROW = "rettention_window_0.05_lean5b"
# On the embedded model's 192-token frames the per-frame window's automatic blocks are 16 tokens (window.py);
# its quality and speed rows were run with those blocks given explicitly.
_LEAN_SPEC = "rettention:density=0.05,block_q=16,dense_steps=0.1,refresh_at=(0.2,0.4,0.6,0.8)"
_WAN13 = "Wan2.1-1.3B 480p 81f, 32,760 tokens"
_WAN14 = "Wan2.1-14B 720p 81f, 75,600 tokens"
_EMBEDDED = "embedded model 49x192x256, 2,496 tokens"
_E2E = "H200 bf16, 50 steps with CFG, steady-state step times composed over the schedule (bench_e2e)"
_E2E_COMPILED = _E2E + ", transformer.compile_repeated_blocks(), against eager stock"
_WAN13_COMPILED = _WAN13 + ", compiled"
_WAN14_COMPILED = _WAN14 + ", compiled"
_HUNYUAN = "HunyuanVideo 720p 129f, 119,056 tokens"
_E2E_ONE_CALL = "H200 bf16, 50 steps, one call per step (embedded guidance), step times composed (bench_e2e)"
_E2E_HY_METHODS = "benchmarks/results/e2e_hunyuan_720p_129f_nvidia_h200_rotary_methods.json"
# Stock, balanced and fast side by side in one run per geometry on one H100 (2026-12-05), and the quality of
# both re-ttention schedules at 50 steps, the length their speed is measured at.
_H100 = "nvidia_h100_80gb_hbm3"
_E2E13_H100 = f"benchmarks/results/e2e_wan1.3b_480p_81f_{_H100}_rettention_schedules.json"
_E2E_HY_H100 = f"benchmarks/results/e2e_hunyuan_720p_129f_{_H100}_rettention_schedules.json"
# Wan-14B's fast compiled.
_E2E14_FAST = "benchmarks/results/e2e_wan14b_720p_81f_nvidia_h200_fast_compiled.json"
# Balanced's schedule, beside stock in one run per geometry on one H100, its quality at 50 steps over the 24
# prompts in one run (with small refreshes on the one-pass kernel, as "auto" runs them now; the two-pass
# refresh gave 31.08 dB / 0.960 over the same prompts, in two runs merged). Its embedded-model speeds are
# _EMBEDDED_H100's (below).
_LEAN5 = f"{_H100}_balanced_lean5"
_E2E13_LEAN = f"benchmarks/results/e2e_wan1.3b_480p_81f_{_LEAN5}.json"
_E2E_HY_LEAN = f"benchmarks/results/e2e_hunyuan_720p_129f_{_LEAN5}.json"
_Q50_FUSED = f"benchmarks/results/quality_tiny_balanced5_fused_refresh_50steps_24prompts_{_H100}.json"
# Stock and balanced, eager and compiled, in one run at Wan-14B (2026-12-06, one H100): balanced's compiled
# speedup against compiled stock comes from the same run. HunyuanVideo's compiled balanced (after the padded-
# text graph-break fix: 0 breaks) and compiled stock ran as two calls on one lease (eager stock 1582.8 and
# 1582.2 s in the two).
_E2E14_SAME = f"benchmarks/results/e2e_wan14b_720p_81f_{_H100}_compiled_same_run.json"
_E2E_HY_BAL_C = f"benchmarks/results/e2e_hunyuan_720p_129f_{_H100}_balanced_compiled.json"
_E2E_HY_STOCK_C = f"benchmarks/results/e2e_hunyuan_720p_129f_{_H100}_stock_compiled.json"
_VS_COMPILED_STOCK = ", transformer.compile_repeated_blocks(), against compiled stock"
_E2E_H100 = _E2E.replace("H200", "H100")
_E2E_COMPILED_H100 = _E2E_COMPILED.replace("H200", "H100")
_E2E_ONE_CALL_H100 = _E2E_ONE_CALL.replace("H200", "H100")
# The fast preset: re-ttention with one refresh at 30% of the run (docs/rettention.md), its bench_e2e row and
# quality row.
_FAST: dict[str, Any] = {"density": 0.05, "dense_steps": 0.1, "refresh_at": (0.3,)}
_FAST_ROW = "rettention_window_0.05_front2"
_FAST_SPEC = "rettention:density=0.05,block_q=16,dense_steps=0.1,refresh_at=(0.3,)"


def _e2e_speed(speedup: float, geometry: str, what: str, path: str, row: str, compiled: bool | None) -> Speed:
    """A bench_e2e row's speedup (``compiled``: which of the row's two timings; None: the row has one)."""
    which = "" if compiled is None else f",compiled={compiled}"
    return Speed(speedup, geometry, what, Source(path, f"rows[row={row}{which}]/speedup"))


# The embedded model: stock, dense and every Wan preset as the table has it (fuse_blocks on), eager and with
# CUDA graphs, 7 interleaved rounds in one run on one H100 (2026-12-06). Its forwards are host-bound, so
# eager ratios move with the host: dense was 1.07x stock in an earlier run and 0.93x in this one; the presets
# without fuse_blocks were 1.01 / 1.01 / 1.02x eager and 2.00 / 1.65 / 1.90x with graphs there
# (profile_embedded_graphs_vs_dense_graphs_nvidia_h100_80gb_hbm3.json). Dense with graphs is the fastest
# here (docs/graphs.md): at 2,496 tokens a replayed sparse forward takes as long as a replayed dense one.
_EMBEDDED_H100 = "benchmarks/results/profile_embedded_presets_fused_blocks_nvidia_h100_80gb_hbm3.json"
# Fast's quality over the 24 prompts at 50 steps on the refresh path it runs now (the two-pass path gave
# 26.23 dB / 0.903 on an H200, quality_tiny_presets_50steps_24prompts_nvidia_h200.json).
_Q50_FAST = "benchmarks/results/quality_tiny_fast_fused_refresh_50steps_24prompts_nvidia_h100_80gb_hbm3.json"


def _embedded_speed(row: str, speedup: float, graphs: bool = False) -> Speed:
    """The embedded model (profile_embedded), eager or with ``cuda_graphs=True`` (docs/graphs.md), against
    stock without graphs in the same run."""
    return Speed(
        speedup,
        _EMBEDDED + (", cuda_graphs=True" if graphs else ""),
        "H100 bf16, whole 30-step render, median of 7 interleaved rounds (profile_embedded)",
        Source(_EMBEDDED_H100, f"renders/{row}{'+graphs' if graphs else ''}/seconds"),
        Source(_EMBEDDED_H100, "renders/stock/seconds"),
    )


_VIDEO_NOTE = (
    "radial with the family's defaults (docs/radial.md), adaspa at the sparsities measured on Wan; nothing "
    "measured at this family's geometry yet"
)
# Image models end to end (random weights, real configs, bf16; one H100, 2026-12-06): eager against eager
# stock and, in a second run on the same lease, compiled against compiled stock. A geometry is its label and
# the stem of its bench_e2e result file.
_FLUX_1024 = ("FLUX.1-dev 1024x1024, 4,608 tokens", "e2e_flux_1024")
_FLUX_2048 = ("FLUX.1-dev 2048x2048, 16,896 tokens", "e2e_flux_2048")
_SD35 = ("SD3.5 Large 1024x1024, 4,429 tokens", "e2e_sd35_large_1024")
_PIXART = ("PixArt-Sigma 2048x2048, 16,384 tokens", "e2e_pixart_sigma_2048")
_QWEN = ("Qwen-Image 1328x1328, 6,953 tokens", "e2e_qwenimage_1328")
_COMPOSED = "steady-state step times composed over the schedule (bench_e2e)"
_E2E_FLUX = f"H100 bf16, 28 steps, one call per step, {_COMPOSED}"
_E2E_SD35 = f"H100 bf16, 28 steps, CFG batched (one call of batch 2 per step), {_COMPOSED}"
_E2E_PIXART = f"H100 bf16, 20 steps, CFG batched (one call of batch 2 per step), {_COMPOSED}"
_E2E_QWEN = f"H100 bf16, 50 steps, true CFG (two calls per step), {_COMPOSED}"
_VS_COMPILED = ", regional compilation, against compiled stock"


def _image_speeds(
    geometries: tuple[tuple[str, str], ...],
    what: str,
    row: str,
    eager: tuple[float, ...],
    compiled: tuple[float, ...] = (),
) -> tuple[Speed, ...]:
    """A preset's bench_e2e speedups at each of ``geometries``, eager against eager stock and compiled
    against compiled stock (the first ``len(compiled)`` geometries, whose ``_compiled`` files timed it)."""
    out = []
    for speedup, (geometry, stem) in zip(eager, geometries):
        path = f"benchmarks/results/{stem}_{_H100}.json"
        out.append(Speed(speedup, geometry, what, Source(path, f"rows[row={row},compiled=False]/speedup")))
    for speedup, (geometry, stem) in zip(compiled, geometries):
        path = f"benchmarks/results/{stem}_{_H100}_compiled.json"
        key = f"rows[row={row},compiled=True]/speedup_vs_same_compile_stock"
        out.append(
            Speed(speedup, geometry + ", compiled, vs compiled stock", what + _VS_COMPILED, Source(path, key))
        )
    return tuple(out)


def _flux_speeds(row: str, eager: tuple[float, float], compiled: tuple[float, ...] = ()) -> tuple[Speed, ...]:
    return _image_speeds((_FLUX_1024, _FLUX_2048), _E2E_FLUX, row, eager, compiled)


_FLUX_NOTE = (
    "adaspa at the Wan sparsities; with random weights attention is flat, so the searches keep "
    "more blocks (1024^2: density 0.50 / 0.34 / 0.28 at sparsity 0.6 / 0.8 / 0.9) than a trained "
    "model's would. At 1024^2 most of the eager gain is dit_accel's fused rotary step, which the "
    "dense preset has too (1.23x, output identical to stock); the sparse attention adds 2-4% "
    "(docs/e2e.md#flux1-dev)"
)


def _image_note(share: str, densities: str) -> str:
    return (
        f"adaspa at the Wan sparsities (radial is video-only). Attention is {share} of a dense step here, "
        f"which bounds what any attention method gains. With random weights attention is flat, so the "
        f"searches keep density {densities} at sparsity 0.6 / 0.8 / 0.9, more than a trained model's would "
        "(docs/e2e.md)"
    )


_SD35_NOTE = _image_note("19%", "0.49 / 0.31 / 0.24")
_PIXART_NOTE = _image_note("65%", "0.40 / 0.20 / 0.10")
_QWEN_NOTE = _image_note("19%", "0.42 / 0.23 / 0.14")

# Knobs that change which kernels run, not the math (up to the last bit of a LayerNorm for fuse_blocks).
_SAME_MATH = ("dense_backend", "fuse_blocks")
# Wan's sparse presets fuse each block's elementwise work (fuse_blocks, docs/kernels.md#fused-blocks): eager,
# a Wan-1.3B step at 480p is 77 ms shorter per call, Wan-14B's at 720p 0.84 s. Compiled blocks run the stock
# forward (the compiler fuses it), so their compiled speeds are those of the knobs without it.
_FUSED = {"fuse_blocks": True}
# Each preset beside stock (and without fuse_blocks) in one run per geometry on one H100 (2026-12-06):
# quality in the _quality_fused runs, balanced and fast in the others (their rows *_fused: the preset's knobs
# then, plus fuse_blocks).
_E2E13_QF = f"benchmarks/results/e2e_wan1.3b_480p_81f_{_H100}_quality_fused.json"
_E2E14_QF = f"benchmarks/results/e2e_wan14b_720p_81f_{_H100}_quality_fused.json"
_E2E13_FUSED = f"benchmarks/results/e2e_wan1.3b_480p_81f_{_H100}_fused_blocks.json"
_E2E14_FUSED = f"benchmarks/results/e2e_wan14b_720p_81f_{_H100}_fused_dense.json"

_ROWS: tuple[Preset, ...] = (
    Preset(
        "wan",
        "dense",
        "dense",
        speed=(_embedded_speed("dense", 0.93), _embedded_speed("dense", 2.35, graphs=True)),
        note="the embedded model's fastest on a GPU with cuda_graphs=True (docs/graphs.md)",
    ),
    Preset(
        "wan",
        "quality",
        "radial",
        _FUSED,
        speed=(
            _e2e_speed(1.78, _WAN13, _E2E_H100, _E2E13_QF, "quality", False),
            Speed(
                1.69, _WAN13_COMPILED, _E2E_COMPILED, Source(_E2E13, "rows[row=radial,compiled=True]/speedup")
            ),
            _e2e_speed(1.80, _WAN14, _E2E_H100, _E2E14_QF, "quality", False),
            _embedded_speed("quality", 0.93),
            _embedded_speed("quality", 2.12, graphs=True),
        ),
        quality=Quality(37.31, 0.985, 0.672, "radial"),
        note="Wan defaults: decay 0.2, sink frame, layer 0 and the first 25% of steps dense",
    ),
    Preset(
        "wan",
        "balanced",
        "rettention",
        {**_LEAN, **_FUSED},
        speed=(
            _e2e_speed(2.32, _WAN13, _E2E_H100, _E2E13_FUSED, "balanced_fused", False),
            _e2e_speed(2.27, _WAN13_COMPILED, _E2E_COMPILED_H100, _E2E13_LEAN, _LEAN_ROW, True),
            _e2e_speed(2.51, _WAN14, _E2E_H100, _E2E14_FUSED, "balanced_fused", False),
            _e2e_speed(2.48, _WAN14_COMPILED, _E2E_COMPILED_H100, _E2E14_SAME, "balanced", True),
            Speed(
                2.22,
                _WAN14 + ", compiled, vs compiled stock",
                _E2E_H100 + _VS_COMPILED_STOCK,
                Source(_E2E14_SAME, "rows[row=balanced,compiled=True]/speedup_vs_same_compile_stock"),
            ),
            _embedded_speed("balanced", 0.98),
            _embedded_speed("balanced", 1.72, graphs=True),
        ),
        quality=Quality(31.10, 0.961, 0.185, _LEAN_SPEC, _Q50_FUSED, steps=50),
        note=(
            "re-ttention on a 5% per-frame window: first 10% of steps dense, statistics refreshed at 10, 20, "
            "40, 60 and 80% of the run (docs/rettention.md)"
        ),
    ),
    Preset(
        "wan",
        "fast",
        "rettention",
        {**_FAST, **_FUSED},
        speed=(
            _e2e_speed(2.54, _WAN13, _E2E_H100, _E2E13_FUSED, "fast_fused", False),
            _e2e_speed(2.47, _WAN13_COMPILED, _E2E_COMPILED_H100, _E2E13_H100, _FAST_ROW, True),
            _e2e_speed(2.79, _WAN14, _E2E_H100, _E2E14_FUSED, "fast_fused", False),
            _e2e_speed(2.71, _WAN14_COMPILED, _E2E_COMPILED, _E2E14_FAST, "fast", True),
            _embedded_speed("fast", 1.00),
            _embedded_speed("fast", 2.01, graphs=True),
        ),
        quality=Quality(26.24, 0.903, 0.124, _FAST_SPEC, _Q50_FAST, steps=50),
        note=(
            "re-ttention on a 5% per-frame window: first 10% of steps dense, one refresh at 30% of the run "
            "(docs/rettention.md)"
        ),
    ),
    # HunyuanVideo's stock attention passes a key mask (padded text), which sends SDPA to a slower kernel
    # than cuDNN's (443 against 304 ms, dense_kvlen_nvidia_h200.json); its sparse presets run their dense
    # steps on dense_attention(backend="auto"), which runs cuDNN on the valid key prefix: a dense step
    # 22.8 s against stock's 31.3 s (e2e, row dense_auto).
    Preset("hunyuan_video", "dense", "dense"),
    Preset(
        "hunyuan_video",
        "quality",
        "radial",
        {"dense_backend": "auto"},
        speed=(Speed(2.50, _HUNYUAN, _E2E_ONE_CALL, Source(_E2E_HY_METHODS, "rows[row=quality]/speedup")),),
        note="radial with HunyuanVideo's defaults (docs/radial.md); dense steps on cuDNN, no key mask",
    ),
    Preset(
        "hunyuan_video",
        "balanced",
        "rettention",
        {**_LEAN, "dense_backend": "auto"},
        speed=(
            _e2e_speed(3.69, _HUNYUAN, _E2E_ONE_CALL_H100, _E2E_HY_LEAN, _LEAN_ROW + "_auto", False),
            _e2e_speed(
                4.22,
                _HUNYUAN + ", compiled",
                _E2E_ONE_CALL_H100 + ", transformer.compile_repeated_blocks(), against eager stock",
                _E2E_HY_BAL_C,
                "balanced",
                True,
            ),
            Speed(
                3.96,
                _HUNYUAN + ", compiled, vs compiled stock",
                _E2E_ONE_CALL_H100 + _VS_COMPILED_STOCK + " (two calls on one lease)",
                Source(_E2E_HY_BAL_C, "rows[row=balanced,compiled=True]/total_s"),
                Source(_E2E_HY_STOCK_C, "rows[row=stock,compiled=True]/total_s"),
            ),
        ),
        note="Wan's balanced schedule; dense steps and refreshes' dense pass on cuDNN, no key mask",
    ),
    Preset(
        "hunyuan_video",
        "fast",
        "rettention",
        {**_FAST, "dense_backend": "auto"},
        speed=(_e2e_speed(4.29, _HUNYUAN, _E2E_ONE_CALL_H100, _E2E_HY_H100, _FAST_ROW + "_auto", None),),
        note="Wan's fast schedule; dense steps and refreshes' dense pass on cuDNN, no key mask",
    ),
    *(
        row
        for family in ("cogvideox", "ltx", "mochi")
        for row in (
            Preset(family, "dense", "dense"),
            Preset(family, "quality", "radial", {}, note=_VIDEO_NOTE),
            Preset(family, "balanced", "adaspa", {"sparsity": 0.8}, note=_VIDEO_NOTE),
            Preset(family, "fast", "adaspa", {"sparsity": 0.9}, note=_VIDEO_NOTE),
        )
    ),
    Preset(
        "flux",
        "dense",
        "dense",
        speed=_flux_speeds("dense", (1.23, 1.15), (1.00, 1.00)),
        note=(
            "dit_accel's processors with the stock attention op: output identical to stock; faster eager by "
            "its fused rotary step, level with stock compiled (inductor fuses stock's rotary too)"
        ),
    ),
    Preset(
        "flux",
        "quality",
        "adaspa",
        {"sparsity": 0.6},
        speed=_flux_speeds("quality", (1.23, 1.31)),
        note=_FLUX_NOTE,
    ),
    Preset(
        "flux",
        "balanced",
        "adaspa",
        {"sparsity": 0.8},
        speed=_flux_speeds("balanced", (1.25, 1.43), (1.02, 1.24)),
        note=_FLUX_NOTE,
    ),
    Preset(
        "flux",
        "fast",
        "adaspa",
        {"sparsity": 0.9},
        speed=_flux_speeds("fast", (1.26, 1.48), (1.04, 1.30)),
        note=_FLUX_NOTE,
    ),
    *(
        row
        # speeds: eager (dense, quality, balanced, fast), then compiled vs compiled stock (balanced, fast)
        for family, geometry, what, note, speeds in (
            ("sd3", _SD35, _E2E_SD35, _SD35_NOTE, ((1.00,), (1.04,), (1.06, 1.08), (1.07, 1.11))),
            ("pixart", _PIXART, _E2E_PIXART, _PIXART_NOTE, ((0.99,), (1.20,), (1.40, 1.44), (1.53, 1.58))),
            ("qwenimage", _QWEN, _E2E_QWEN, _QWEN_NOTE, ((1.00,), (1.06,), (1.09, 1.10), (1.11, 1.14))),
        )
        for row in (
            Preset(family, "dense", "dense", speed=_image_speeds((geometry,), what, "dense", speeds[0])),
            *(
                Preset(
                    family,
                    name,
                    "adaspa",
                    {"sparsity": sparsity},
                    speed=_image_speeds((geometry,), what, name, measured[:1], measured[1:]),
                    note=note,
                )
                for name, sparsity, measured in zip(
                    ("quality", "balanced", "fast"), (0.6, 0.8, 0.9), speeds[1:]
                )
            ),
        )
    ),
)


def _method_config(p: Preset) -> tuple:
    """A row's method and knobs, less ``dense_backend`` and ``fuse_blocks`` (which kernels run the same
    math)."""
    return p.method, tuple(sorted((k, v) for k, v in p.knobs.items() if k not in _SAME_MATH))


# Embedded-model quality of method configurations (as _method_config gives them) that no Wan preset uses
# any more (adaspa 0.9 was Wan's "fast" until 2026-12-05); other families' rows with those knobs carry it.
_EMBEDDED_QUALITY = {("adaspa", (("sparsity", 0.9),)): Quality(22.91, 0.853, 0.138, "adaspa:sparsity=0.9")}


def _attach_embedded_quality(rows: tuple[Preset, ...]) -> tuple[Preset, ...]:
    """Rows of other families whose method configuration equals a Wan row (or one of
    :data:`_EMBEDDED_QUALITY`) measured on the embedded model carry that quality too (the speed stays the
    family's own)."""
    by_config = {
        **_EMBEDDED_QUALITY,
        **{_method_config(p): p.quality for p in rows if p.family == "wan" and p.quality},
    }
    out = []
    for p in rows:
        q = by_config.get(_method_config(p))
        if p.quality is None and q is not None and p.method != "radial":  # radial's knobs are per family
            p = dataclasses.replace(p, quality=q)
        out.append(p)
    return tuple(out)


_TABLE: dict[tuple[str, str], Preset] = {(p.family, p.name): p for p in _attach_embedded_quality(_ROWS)}


def table() -> tuple[Preset, ...]:
    """Every preset row, family by family in :data:`FAMILIES` order."""
    return tuple(p for family in FAMILIES for p in family_presets(family))


def family_presets(family: str) -> tuple[Preset, ...]:
    """The presets of ``family``: :data:`PRESET_NAMES` first, then any others."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {list(FAMILIES)}")
    rows = [p for (f, _), p in _TABLE.items() if f == family]
    order = {name: i for i, name in enumerate(PRESET_NAMES)}
    return tuple(sorted(rows, key=lambda p: order.get(p.name, len(order))))


def all_preset_names() -> tuple[str, ...]:
    names = dict.fromkeys(PRESET_NAMES)
    names.update(dict.fromkeys(p.name for p in _TABLE.values()))
    return tuple(names)


def get_preset(family: str, name: str) -> Preset:
    """The row for ``family`` and preset ``name``; a ValueError naming the family's presets otherwise."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {list(FAMILIES)}")
    preset = _TABLE.get((family, name))
    if preset is None:
        names = [p.name for p in family_presets(family)]
        raise ValueError(f"no preset {name!r} for {family}; its presets: {names}")
    return preset


# ------------------------------------------------------------------------------------- knobs and settings


def config_fields() -> tuple[str, ...]:
    """The :class:`dit_accel.SparseAttentionConfig` fields every method takes as knobs."""
    return tuple(
        f.name for f in dataclasses.fields(SparseAttentionConfig) if f.name not in ("method", "options")
    )


def check_knobs(method, knobs: Mapping[str, Any], family: str | None = None) -> SparseAttentionConfig:
    """Validate ``method`` and ``knobs`` without a model: names, values, and the family when known.

    Args:
        method: a method name (:func:`dit_accel.methods.method_names`) or a SparseMethod instance.
        knobs: method options and config fields.
        family: when given, the method is also asked whether it serves this family (radial refuses images).

    Returns:
        the :class:`dit_accel.SparseAttentionConfig` these knobs make.

    Raises:
        ValueError: an unknown method, a knob the method does not take (the message names its knobs), or a
            value the config or the method refuses.
    """
    fields = config_fields()
    if isinstance(method, SparseMethod):
        own: tuple[str, ...] = ()
    elif isinstance(method, str) and method in method_names():
        own = method_knobs(method)
    else:
        raise ValueError(f"unknown method {method!r}; methods: {list(method_names())}")
    label = method if isinstance(method, str) else type(method).__name__
    unknown = [k for k in knobs if k not in own and k not in fields]
    if unknown:
        raise ValueError(
            f"method {label!r} takes no knob {', '.join(map(repr, unknown))}; its knobs: "
            f"{list(own) or 'none'}, and every method's: {list(fields)}"
        )
    try:
        config = SparseAttentionConfig.from_knobs(method=method, **knobs)
        instance = create_method(config)
        if family is not None:
            config = instance.configure(config, (_family(family),))
    except TypeError as exc:
        raise ValueError(f"{label}: {exc}") from None
    return config


@dataclass(frozen=True)
class Settings:
    """What a wrapped pipeline applies: the preset it started from (None: knobs only), method and knobs."""

    method: Any
    knobs: Mapping[str, Any]
    preset: str | None = None

    @property
    def method_name(self) -> str:
        return self.method if isinstance(self.method, str) else type(self.method).__name__

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.knobs.items())
        head = f"preset {self.preset!r}: " if self.preset else ""
        return f"{head}{self.method_name}" + (f" ({knobs})" if knobs else "")


# Knobs that choose the same thing another way: one given on top of a preset replaces the preset's other.
_ALTERNATIVES = {
    "tau": "sparsity",
    "sparsity": "tau",
    "refresh_at": "refresh_every",
    "refresh_every": "refresh_at",
}


def merged_knobs(preset_knobs: Mapping[str, Any], knobs: Mapping[str, Any]) -> dict:
    """``knobs`` on top of a preset's (or earlier overrides): a knob's alternative below is dropped
    (``tau`` replaces ``sparsity``, ``refresh_at`` replaces ``refresh_every``, and the other way round)."""
    dropped = {_ALTERNATIVES[k] for k in knobs if k in _ALTERNATIVES and _ALTERNATIVES[k] not in knobs}
    return {**{k: v for k, v in preset_knobs.items() if k not in dropped}, **knobs}


def resolve(
    family: str | None, preset: str | None = None, knobs: Mapping[str, Any] | None = None
) -> Settings:
    """The settings of a preset with knobs on top, validated (see :func:`check_knobs`).

    ``knobs`` override the preset's. A ``method`` knob without a preset runs that method with ``knobs`` only
    (no preset); a preset and a different method is an error. With neither, the preset is "balanced".

    Args:
        family: the family (``FAMILIES``); None when the model is not known yet (then a preset is checked by
            name against every family and its knobs resolved later).
        preset: a preset name.
        knobs: method options and config fields, and optionally ``method``.
    """
    knobs = dict(knobs or {})
    method = knobs.pop("method", None)
    if preset is not None and not isinstance(preset, str):
        raise ValueError(f"preset must be a name, got {preset!r}")
    if method is not None and preset is not None:
        methods = _preset_methods(family, preset)
        if method not in methods:
            raise ValueError(
                f"preset {preset!r} is method {' or '.join(map(repr, sorted(methods)))}; got "
                f"method={method!r} too. Give the preset with knobs, or method= with its knobs"
            )
        if family is None:
            _check_unknown_family(preset, knobs)
            return Settings(None, knobs, preset)
        row = get_preset(family, preset)
        return _checked(family, Settings(method, merged_knobs(row.knobs, knobs), preset))
    if method is not None:
        return _checked(family, Settings(method, knobs, None))
    preset = preset or "balanced"
    if family is None:
        _check_unknown_family(preset, knobs)
        return Settings(None, knobs, preset)
    row = get_preset(family, preset)
    return _checked(family, Settings(row.method, merged_knobs(row.knobs, knobs), preset))


def _check_unknown_family(preset: str, knobs: dict) -> None:
    """Before the model is known: the preset exists, and the knobs fit its method in some family."""
    rows = {(p.method, tuple(p.knobs.items())): p for p in _TABLE.values() if p.name == preset}
    if not rows:
        raise ValueError(f"unknown preset {preset!r}; presets: {list(all_preset_names())}")
    errors = []
    for p in rows.values():
        try:
            check_knobs(p.method, {**p.knobs, **knobs})
        except ValueError as exc:
            errors.append(exc)
    if len(errors) == len(rows):
        raise errors[0]


def _preset_methods(family: str | None, preset: str) -> set[str]:
    if family is not None:
        return {get_preset(family, preset).method}
    methods = {p.method for p in _TABLE.values() if p.name == preset}
    if not methods:
        raise ValueError(f"unknown preset {preset!r}; presets: {list(all_preset_names())}")
    return methods


def _checked(family, settings: Settings) -> Settings:
    try:
        check_knobs(settings.method, settings.knobs, family)
    except ValueError as exc:
        if settings.preset is None:
            raise
        raise ValueError(f"preset {settings.preset!r} of {family} is {settings.method_name}: {exc}") from None
    return settings


def resolved_knobs(method: str, knobs: Mapping[str, Any], family: str) -> dict[str, Any]:
    """Every knob of ``method`` as it runs for ``family`` with ``knobs``, plus ``dense_steps`` and
    ``dense_layers``: defaults and per-family values filled in where the configured method exposes them as
    attributes of the knob's name (radial's decay, adaspa's sparsity), else the value given (None if not)."""
    config = SparseAttentionConfig.from_knobs(method=method, **knobs)
    instance = create_method(config)
    config = instance.configure(config, (_family(family),))
    out = {k: getattr(instance, k, knobs.get(k)) for k in method_knobs(method)}
    out.update(dense_steps=config.dense_steps, dense_layers=config.dense_layers)
    return out


# ------------------------------------------------------------------------------------------- formatting


def _num(value: float, fmt: str) -> str:
    return "inf" if math.isinf(value) else format(value, fmt)


def speed_text(p: Preset) -> str:
    if p.method == "dense" and not p.speed:
        return "1.00 (stock)"
    if not p.speed:
        return "untuned"
    return "; ".join(f"{s.speedup:.2f}x {s.geometry} ({s.gpu})" for s in p.speed)


def quality_text(p: Preset) -> str:
    if p.method == "dense":
        return "reference"
    if p.quality is None:
        return "untuned"
    q = p.quality
    on = "" if p.family == "wan" else " (embedded Wan model, same knobs)"
    run = "" if (q.steps, q.prompts) == (30, 24) else f", {q.steps} steps, {q.prompts} prompts"
    return f"{_num(q.psnr, '.2f')} dB / {q.ssim:.3f} at density {q.density:.3f}{run}{on}"


def markdown_table(family: str | None = None) -> str:
    """The preset table as markdown (docs/pipelines.md prints it; a test checks the doc is current)."""
    families = [family] if family else list(FAMILIES)
    lines = [
        "| family | preset | method | knobs | speedup vs stock (geometry) "
        "| PSNR / SSIM vs dense, embedded model | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for fam in families:
        for p in family_presets(fam):
            lines.append(
                f"| {fam} ({FAMILIES[fam]}) | {p.name} | {p.method} | {p.knob_text()} | {speed_text(p)} "
                f"| {quality_text(p)} | {p.status} |"
            )
    return "\n".join(lines)


def sources_text(family: str | None = None) -> str:
    """One line per measurement: the number, what it is and where it was read."""
    lines = []
    for p in family_presets(family) if family else table():
        for s in p.speed:
            src = str(s.source) + (f" (stock: {s.baseline.key})" if s.baseline else "")
            lines.append(f"- {p.family} {p.name}: {s.speedup:.2f}x at {s.geometry}; {s.what}; `{src}`")
        if p.quality is not None and p.family == "wan":
            lines.append(
                f"- {p.family} {p.name}: {p.quality.psnr:.2f} dB / {p.quality.ssim:.3f}; "
                f"`{p.quality.path}` row `{p.quality.row}`"
            )
    return "\n".join(lines)
