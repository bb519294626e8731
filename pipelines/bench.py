"""Whole-render timing on this machine: stock attention against presets (or any method and knobs), the same
call and seed each time, with each output compared to stock's.

This is the number a user of a wrapped pipeline feels on their own GPU and model: the whole pipeline call
(text encoder, every denoising step with its CFG calls, VAE decode), not the transformer alone. The GPU
benchmark of the transformer over a real 50-step schedule, with per-step-kind times, is
``benchmarks/bench_e2e.py`` (docs/e2e.md); this one needs nothing but a pipeline.

    from dit_accel.pipelines import bench, load_pipeline
    rows = bench.run(load_pipeline("embedded"), ["quality", "balanced"], prompt="...", num_inference_steps=30)
    print(bench.format_table(rows))

The command line: ``dit-accel bench`` (``dit_accel/cli.py``).

Each configuration is applied, rendered ``warmup`` times untimed (dit_accel's kernels compile on first use),
then ``repeats`` times timed (CUDA-synchronised wall time; the median is reported), and removed. Stock
attention is rendered the same way first; every configuration's last output is compared with stock's
(PSNR / SSIM per frame, :mod:`dit_accel.pipelines.quality`), and its density read from its stats.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import quality
from .wrapped import family_of, wrap

__all__ = ["BenchRow", "format_table", "parse_config", "run"]

STOCK = "stock"


@dataclass
class BenchRow:
    """One configuration's result.

    Attributes:
        name: ``"stock"``, a preset name, or a method spec (``"window:density=0.25"``).
        settings: what was applied (``Settings.describe()``), or "stock attention".
        seconds: median wall time of a timed render; all_seconds every timed render; first_seconds the
            first (untimed) render, which includes compiling kernels.
        speedup: stock's seconds / seconds.
        psnr_mean, psnr_worst, ssim_mean: against stock's output, same seed (inf / 1.0 when identical).
        density, plan_density, overall_density: as :class:`dit_accel.pipelines.Comparison` has them.
        error: why the configuration could not run (the other fields are then empty).
    """

    name: str
    settings: str
    seconds: float | None = None
    all_seconds: list[float] = field(default_factory=list)
    first_seconds: float | None = None
    speedup: float | None = None
    psnr_mean: float | None = None
    psnr_worst: float | None = None
    ssim_mean: float | None = None
    density: float | None = None
    plan_density: float | None = None
    overall_density: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_config(spec: str) -> tuple[str | None, dict]:
    """``"balanced"`` -> (preset, {}); ``"window:density=0.25"`` -> (None, {"method": "window", ...}): a
    method spec as the quality harness takes it (``method:key=value,...``)."""
    from dit_accel.methods import method_names

    name = spec.split(":", 1)[0].strip()
    if ":" not in spec and name not in method_names():
        return name, {}
    method, knobs = quality.parse_method_spec(spec)
    return None, {"method": method, **knobs}


def _timed_renders(pipe, call: Mapping[str, Any], seed: int, warmup: int, repeats: int):
    first = None
    for _ in range(warmup):
        _, s = quality.timed(quality.render_output, pipe, seed=seed, **call)
        first = s if first is None else first
    times, output = [], None
    for _ in range(repeats):
        output, s = quality.timed(quality.render_output, pipe, seed=seed, **call)
        first = s if first is None else first
        times.append(s)
    return output, times, first


def run(
    pipe,
    configs: Sequence[str],
    *,
    seed: int = 0,
    warmup: int = 1,
    repeats: int = 2,
    on_row: Callable[[BenchRow], None] | None = None,
    knobs: Mapping[str, Any] | None = None,
    **call,
) -> list[BenchRow]:
    """Time stock attention, then each configuration, on the same pipeline call and seed.

    Args:
        pipe: a diffusers pipeline of a supported family, stock attention installed.
        configs: preset names of the pipeline's family (``"balanced"``) or method specs
            (``"window:density=0.25"``, ``"rettention:base=radial"``); checked before anything renders.
        seed: the seed of every render (a CPU generator).
        warmup: untimed renders per configuration (>= 0); repeats: timed renders (>= 1).
        on_row: called with each finished row (stock first), e.g. to print or save it as the run goes.
        knobs: added to every configuration's own (e.g. ``{"cuda_graphs": True}``); stock stays stock.
        call: the pipeline's own arguments (``prompt``, ``num_inference_steps``, ...); ``output_type`` is
            "np", ``generator`` is made from ``seed``.

    Returns:
        one :class:`BenchRow` per configuration, stock first. A configuration that fails while rendering is
        recorded with its error and the run goes on.

    Raises:
        ValueError: a bad ``warmup``/``repeats``, an unknown preset or method, or a bad knob (before any
            render).
    """
    from dit_accel.pipelines.presets import resolve

    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for key in ("generator", "output_type"):
        if key in call:
            raise ValueError(f"bench makes {key} itself: pass seed=..., not {key}=")
    family = family_of(pipe)
    parsed = []
    extra = dict(knobs or {})
    for spec in configs:
        preset, spec_knobs = parse_config(spec)
        spec_knobs = {**extra, **spec_knobs}
        resolve(family, preset, spec_knobs)  # raises ValueError naming the bad preset, method or knob
        parsed.append((spec, preset, spec_knobs))

    def emit(row):
        if on_row is not None:
            on_row(row)
        return row

    stock_out, times, first = _timed_renders(pipe, call, seed, warmup, repeats)
    stock_s = statistics.median(times)
    stock_frames = quality.as_frames(stock_out)
    rows = [
        emit(
            BenchRow(
                STOCK,
                "stock attention",
                stock_s,
                times,
                first,
                1.0,
                math.inf,
                math.inf,
                1.0,
            )
        )
    ]
    for spec, preset, knobs in parsed:
        accel = wrap(pipe, preset, **knobs)
        row = BenchRow(spec, accel.settings.describe())
        try:
            out, times, first = _timed_renders(accel, call, seed, warmup, repeats)
            metrics = quality.frame_metrics(stock_frames, quality.as_frames(out))
            density = quality.attention_density(accel.stats().records)
            row.seconds = statistics.median(times)
            row.all_seconds, row.first_seconds = times, first
            row.speedup = stock_s / row.seconds if row.seconds > 0 else math.nan
            row.psnr_mean, row.ssim_mean = metrics["psnr_mean"], metrics["ssim_mean"]
            row.psnr_worst = min(metrics["psnr"])
            row.density = density["density"]
            row.plan_density = density["plan_density"]
            row.overall_density = density["overall_density"]
        except Exception as exc:  # noqa: BLE001 - recorded; the other configurations still run
            row.error = f"{type(exc).__name__}: {exc}"
        finally:
            accel.remove()
        rows.append(emit(row))
    return rows


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, fmt)


def format_table(rows: Sequence[BenchRow]) -> str:
    """A markdown table of the rows: seconds, speedup, PSNR / SSIM against stock, density."""
    lines = [
        "| config | settings | seconds (median) | first render s | speedup | PSNR dB (mean / worst) | SSIM "
        "| density |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | {r.settings} | failed: {r.error[:120]} | | | | | |")
            continue
        lines.append(
            f"| {r.name} | {r.settings} | {_cell(r.seconds, '.2f')} | {_cell(r.first_seconds, '.2f')} "
            f"| {_cell(r.speedup, '.2f')}x | {_cell(r.psnr_mean, '.2f')} / {_cell(r.psnr_worst, '.2f')} "
            f"| {_cell(r.ssim_mean, '.4f')} | {_cell(r.density, '.3f')} |"
        )
    return "\n".join(lines)
