"""Quality harness: the same prompt and seed rendered dense and with a dit_accel configuration, compared on
raw decoded frames (before any video encoding) with PSNR and SSIM per frame, plus prompt adherence when the
prompt is a caption of the embedded tiny model's grammar.

Works with any diffusers pipeline that takes ``prompt``, ``generator`` and ``output_type="np"`` and returns
``.frames`` (video) or ``.images`` (one frame). Only the public API is used: :func:`dit_accel.apply` and
:func:`dit_accel.remove`.

    python -m dit_accel.pipelines.quality --device cuda --methods dense "window:density=0.25" \
        --prompts 8 --out docs/quality_tiny.md

SSIM follows Wang et al. 2004: Gaussian window 11, sigma 1.5, C1 = 0.01^2, C2 = 0.03^2 for data range 1, valid
filtering, computed per RGB channel and averaged (pytorch-msssim's and skimage's ``gaussian_weights`` recipe).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import statistics
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import dit_accel

__all__ = [
    "as_frames",
    "attention_density",
    "compare",
    "format_table",
    "frame_metrics",
    "merge_reports",
    "parse_method_spec",
    "psnr",
    "quality_table",
    "render_frames",
    "render_output",
    "ssim",
    "timed",
]


def _frames_tensor(frames) -> torch.Tensor:
    x = frames if torch.is_tensor(frames) else torch.from_numpy(np.asarray(frames))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"frames must be [F, H, W, C] (or [H, W, C]) in [0, 1], got {tuple(x.shape)}")
    return x.double()


def psnr(a, b) -> torch.Tensor:
    """PSNR in dB per frame of two clips [F, H, W, C] in [0, 1] (data range 1); inf where identical."""
    x, y = _frames_tensor(a), _frames_tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"clips differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-300)), torch.full_like(mse, math.inf))


def _gaussian(window: int, sigma: float, dtype) -> torch.Tensor:
    coords = torch.arange(window, dtype=dtype) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a, b, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per frame of two clips [F, H, W, C] in [0, 1] (see the module docstring); 1 where identical."""
    x, y = _frames_tensor(a), _frames_tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"clips differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[1], x.shape[2]) < window:
        raise ValueError(f"frames of {tuple(x.shape[1:3])} are smaller than the SSIM window {window}")
    x, y = x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2)  # [F, C, H, W]
    channels = x.shape[1]
    g = _gaussian(window, sigma, x.dtype).to(x.device)
    gh = g.view(1, 1, 1, window).repeat(channels, 1, 1, 1)
    gv = g.view(1, 1, window, 1).repeat(channels, 1, 1, 1)

    def filt(t):
        t = torch.nn.functional.conv2d(t, gh, groups=channels)
        return torch.nn.functional.conv2d(t, gv, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(1)


def render_output(pipe, *args, seed: int = 0, **call_kwargs) -> np.ndarray:
    """Render once and return the pipeline's ``output_type="np"`` output as float32 numpy: video pipelines
    [B, F, H, W, 3], image pipelines [B, H, W, 3], values in [0, 1].

    ``args`` and ``call_kwargs`` go to the pipeline unchanged; the generator is a CPU ``torch.Generator``
    seeded with ``seed``, so the initial noise does not depend on the device.
    """
    out = pipe(*args, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call_kwargs)
    data = out.frames if hasattr(out, "frames") else out.images
    if torch.is_tensor(data):
        data = data.float().cpu().numpy()
    if isinstance(data, (list, tuple)):
        data = np.stack([np.asarray(d) for d in data])
    return np.asarray(data, dtype=np.float32)


def as_frames(output: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] frames of a :func:`render_output` result: every frame of every video, or every image."""
    output = np.asarray(output)
    if output.ndim == 5:
        return output.reshape(-1, *output.shape[2:])
    if output.ndim == 4:
        return output
    if output.ndim == 3:
        return output[None]
    raise ValueError(f"expected [B, F, H, W, 3] or [B, H, W, 3] output, got {output.shape}")


def render_frames(pipe, prompt: str | None = None, seed: int = 0, **call_kwargs) -> np.ndarray:
    """Render one clip: [F, H, W, 3] float in [0, 1], the pipeline's raw decoded frames (of the first output).

    The generator is a CPU ``torch.Generator`` seeded with ``seed``, so the initial noise does not depend on
    the device. ``call_kwargs`` go to the pipeline (``num_frames``, ``height``, ``num_inference_steps``, ...);
    ``prompt`` is passed when given.
    """
    if prompt is not None:
        call_kwargs["prompt"] = prompt
    out = render_output(pipe, seed=seed, **call_kwargs)
    return as_frames(out[:1])


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), wall seconds)``, CUDA-synchronised before and after when CUDA is available."""
    _sync()
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    _sync()
    return result, time.perf_counter() - t0


def _timed_render(pipe, prompt, seed, call_kwargs):
    return timed(render_frames, pipe, prompt, seed, **call_kwargs)


def frame_metrics(dense, frames) -> dict:
    """PSNR and SSIM per frame of ``frames`` against ``dense`` (both [F, H, W, 3] in [0, 1]), and their means:
    ``psnr_mean`` is inf when every frame is identical and NaN when only some are."""
    p, s = psnr(dense, frames), ssim(dense, frames)
    return {"psnr": p.tolist(), "ssim": s.tolist(), "psnr_mean": _summary(p), "ssim_mean": float(s.mean())}


def attention_density(records: list[dict]) -> dict:
    """From :class:`dit_accel.AttentionStats` records: ``density`` (mean over the sparse calls, 1.0 when
    none), ``plan_density`` (mean over the calls that ran only a plan's blocks, kinds ``sparse`` and
    ``corrected``: without searches and refreshes, which compute every block; None when there were none),
    ``overall_density`` (mean over every call, dense calls counting 1.0), ``sparse_calls`` and ``calls``."""
    sparse = [r for r in records if r["kind"] != "dense" and not math.isnan(r["density"])]
    planned = [r["density"] for r in sparse if r["kind"] in ("sparse", "corrected")]
    every = [1.0 if r["kind"] == "dense" else r["density"] for r in records if not math.isnan(r["density"])]
    return {
        "density": sum(r["density"] for r in sparse) / len(sparse) if sparse else 1.0,
        "plan_density": sum(planned) / len(planned) if planned else None,
        "overall_density": sum(every) / len(every) if every else 1.0,
        "sparse_calls": len(sparse),
        "calls": len(records),
    }


def _adherence(frames, prompt):
    from .tiny_video.adherence import score_clip
    from .tiny_video.data import parse_caption

    if parse_caption(prompt) is None:
        return None
    r = score_clip(frames, prompt)
    return {"score": r["score"], "correct": r["correct"], "observed": r["observation"].describe()}


def _summary(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    if len(finite) < len(values):
        return math.inf if len(finite) == 0 else float("nan")
    return float(values.mean())


# diffusers step caches the harness can compose with a method (spec suffix "+taylorseer"), with the settings
# benchmarks/bench_e2e.py times: TaylorSeer in lite mode, computing steps 0-2 and then every 5th.
STEP_CACHES: dict[str, dict] = {
    "taylorseer": {
        "cache_interval": 5,
        "disable_cache_before_step": 3,
        "max_order": 1,
        "use_lite_mode": True,
    },
}


def step_cache_config(name: str, **overrides):
    """The diffusers config object of a step cache in :data:`STEP_CACHES` (``overrides`` replace settings)."""
    if name not in STEP_CACHES:
        raise ValueError(f"step_cache must be one of {sorted(STEP_CACHES)}, got {name!r}")
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(**{**STEP_CACHES[name], **overrides})


def compare(
    pipe,
    prompt: str,
    config: dit_accel.SparseAttentionConfig | None = None,
    *,
    seed: int = 0,
    dense=None,
    call_kwargs: dict | None = None,
    step_cache: str | None = None,
    **knobs,
) -> dict:
    """Render ``prompt`` dense and with a dit_accel configuration; compare the raw frames.

    Any dit_accel installation on ``pipe`` is removed first (the reference must be stock attention) and the
    pipeline is left without one.

    Args:
        pipe: a diffusers pipeline (see the module docstring).
        prompt: the text prompt; adherence is scored when it is a caption of the tiny model's grammar.
        config, knobs: what :func:`dit_accel.apply` takes (``method="window", density=0.25``).
        seed: seed of the CPU generator of both renders.
        dense: frames of an earlier dense render of the same prompt, seed and call_kwargs, to skip rendering.
        call_kwargs: pipeline call arguments besides prompt/generator/output_type.
        step_cache: a diffusers step cache (:data:`STEP_CACHES`) enabled on the transformer after the
            dit_accel installation, for the accelerated render only; disabled again afterwards.

    Returns:
        dict with ``psnr`` and ``ssim`` (lists, one per frame), ``psnr_mean`` (inf when every frame is
        identical; NaN when only some are), ``ssim_mean``, ``adherence_dense`` / ``adherence`` (None for a
        prompt outside the grammar), ``seconds_dense`` / ``seconds`` (wall time of each render; None for a
        reused dense render), ``density`` (mean computed-block density of the sparse attention calls, 1.0 when
        none), ``sparse_calls``, ``dense_frames`` and ``frames`` ([F, H, W, 3] numpy).
    """
    call_kwargs = dict(call_kwargs or {})
    dit_accel.remove(pipe)
    seconds_dense = None
    if dense is None:
        dense, seconds_dense = _timed_render(pipe, prompt, seed, call_kwargs)
    cache = step_cache_config(step_cache) if step_cache is not None else None
    handle = dit_accel.apply(pipe, config, **knobs)
    try:
        if cache is not None:
            pipe.transformer.enable_cache(cache)
        frames, seconds = _timed_render(pipe, prompt, seed, call_kwargs)
        records = handle.stats().records
    finally:
        if cache is not None:
            pipe.transformer.disable_cache()
        dit_accel.remove(pipe)
    metrics = frame_metrics(dense, frames)
    density = attention_density(records)
    return {
        "prompt": prompt,
        "seed": seed,
        **metrics,
        "adherence_dense": _adherence(dense, prompt),
        "adherence": _adherence(frames, prompt),
        "seconds_dense": seconds_dense,
        "seconds": seconds,
        "density": density["density"],
        "plan_density": density["plan_density"],
        "sparse_calls": density["sparse_calls"],
        "dense_frames": dense,
        "frames": frames,
    }


def parse_method_spec(spec: str) -> tuple[str, dict]:
    """``"window:density=0.25,dense_steps=0.25"`` -> ("window", {"density": 0.25, "dense_steps": 0.25}).

    Values are Python literals where they parse (``dense_layers=(0,)``), else strings. A suffix naming a step
    cache composes it: ``"adaspa:sparsity=0.9+taylorseer"`` -> ("adaspa", {"sparsity": 0.9, "step_cache":
    "taylorseer"}).
    """
    knobs = {}
    head, plus, tail = spec.rpartition("+")
    if plus and tail.strip() in STEP_CACHES:
        spec, knobs["step_cache"] = head, tail.strip()
    name, _, rest = spec.partition(":")
    for item in filter(None, _split_top(rest)):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad knob {item!r} in {spec!r}: expected key=value")
        knobs[key.strip()] = parse_value(value.strip())
    return name.strip(), knobs


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{" and 1 or 0
        depth -= ch in ")]}" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def quality_table(
    pipe,
    prompts: list[str],
    methods: dict[str, dict],
    *,
    seed: int = 0,
    call_kwargs: dict | None = None,
    on_prompt=None,
) -> list[dict]:
    """One row per method: PSNR/SSIM against dense averaged over ``prompts`` (each rendered dense once, same
    seed), adherence of dense and of the method, render seconds and attention density.

    Args:
        methods: label -> knobs for :func:`dit_accel.apply` (``{"window 25%": {"method": "window",
            "density": 0.25}}``).
        on_prompt: called with the rows over the prompts done so far after each prompt (a long run that is
            stopped keeps what it finished).
    """
    dense = {}
    dense_runs: list[dict] = []
    per_method: dict[str, list[dict]] = {label: [] for label in methods}
    rows: list[dict] = []
    for prompt in tqdm(prompts, desc="quality", unit="prompt", disable=on_prompt is None):
        for label, knobs in methods.items():
            r = compare(pipe, prompt, seed=seed, dense=dense.get(prompt), call_kwargs=call_kwargs, **knobs)
            if prompt not in dense:
                dense[prompt] = r["dense_frames"]
                dense_runs.append(r)
            per_method[label].append(r)
        rows = [_row("dense (reference)", {}, dense_runs, dense_side=True)]
        rows += [_row(label, methods[label], runs) for label, runs in per_method.items()]
        if on_prompt is not None:
            on_prompt(rows)
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _row(label, knobs, runs, dense_side=False):
    adh_key, sec_key = ("adherence_dense", "seconds_dense") if dense_side else ("adherence", "seconds")
    all_psnr = [v for r in runs for v in r["psnr"]]
    finite = [v for v in all_psnr if math.isfinite(v)]
    return {
        "method": label,
        "knobs": {k: v for k, v in knobs.items()},
        "prompts": len(runs),
        "psnr": math.inf if dense_side or not finite else _mean(finite),
        "psnr_min_frame": math.inf if dense_side or not finite else min(finite),
        "identical_frames": sum(not math.isfinite(v) for v in all_psnr) if not dense_side else None,
        "frames": len(all_psnr),
        "ssim": 1.0 if dense_side else _mean([r["ssim_mean"] for r in runs]),
        "adherence": _mean([r[adh_key]["score"] if r[adh_key] else None for r in runs]),
        # median: the first render of a method includes compiling its kernels
        "seconds": statistics.median([r[sec_key] for r in runs]) if runs else None,
        "density": 1.0 if dense_side else _mean([r["density"] for r in runs]),
        "plan_density": None if dense_side else _mean([r.get("plan_density") for r in runs]),
    }


def _weighted(pairs) -> float | None:
    """Mean of values weighted by counts, over the (value, count) pairs whose value is not None."""
    pairs = [(v, n) for v, n in pairs if v is not None and n]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def _frame_count(report: dict, row: dict) -> int:
    """Frames a row averages over (reports before the ``frames`` field: prompts x frames per clip)."""
    return row.get("frames") or row["prompts"] * report["call"]["num_frames"]


def _merge_rows(label: str, parts: list[tuple[dict, dict]]) -> dict:
    """One method's row over several reports' prompts (``parts``: (report, row) pairs), as one run gives
    it."""
    rows = [row for _, row in parts]
    prompts = [row["prompts"] for row in rows]
    merged = {
        "method": label,
        "knobs": rows[0]["knobs"],
        "prompts": sum(prompts),
        "adherence": _weighted(zip([r["adherence"] for r in rows], prompts)),
        "seconds": None,  # a median does not combine; each part's stays
        "seconds_by_part": [r["seconds"] for r in rows],
        "frames": sum(_frame_count(rep, r) for rep, r in parts),
    }
    if rows[0]["identical_frames"] is None:  # the dense reference
        return {**merged, "psnr": math.inf, "psnr_min_frame": math.inf, "identical_frames": None,
                "ssim": 1.0, "density": 1.0, "plan_density": None}  # fmt: skip
    # PSNR is a mean over the frames that differ from dense (identical frames are counted apart)
    finite = [_frame_count(rep, r) - r["identical_frames"] for rep, r in parts]
    mins = [r["psnr_min_frame"] for r in rows if math.isfinite(r["psnr_min_frame"])]
    psnr_mean = _weighted((r["psnr"], n) for r, n in zip(rows, finite) if math.isfinite(r["psnr"]))
    return {
        **merged,
        "psnr": math.inf if psnr_mean is None else psnr_mean,
        "psnr_min_frame": min(mins) if mins else math.inf,
        "identical_frames": sum(r["identical_frames"] for r in rows),
        "ssim": _weighted(zip([r["ssim"] for r in rows], prompts)),
        "density": _weighted(zip([r["density"] for r in rows], prompts)),
        "plan_density": _weighted(zip([r.get("plan_density") for r in rows], prompts)),
    }


def merge_reports(reports: list[dict]) -> dict:
    """One report over the prompts of several runs of this harness (``--out`` JSON), equal to one run over
    all of them: a run stopped at its time limit and a run of the prompts it did not reach
    (``--first-prompt``), say. PSNR, SSIM, adherence and densities are means over frames or prompts and
    combine by their counts; the worst frame is the minimum. Median render seconds do not combine: a merged
    row keeps each part's (``seconds_by_part``) and its ``seconds`` is None.

    Rows are matched by their method label; a label missing from a part is left out of the result
    (``dropped``).

    Raises:
        ValueError: fewer than two parts; parts that differ in call arguments, seed or device; prompt ranges
            that overlap or leave a gap; no method row common to every part.
    """
    if len(reports) < 2:
        raise ValueError(f"merging needs at least two reports, got {len(reports)}")
    for key in ("call", "seed", "device"):
        values = [r[key] for r in reports]
        if any(v != values[0] for v in values):
            raise ValueError(f"the reports differ in {key!r}: {values}; only runs of one setup merge")
    spans = sorted(
        (r["first_prompt"], r["first_prompt"] + r["rows"][0]["prompts"], i) for i, r in enumerate(reports)
    )
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start != end:
            what = "overlap" if start < end else "leave a gap"
            raise ValueError(
                f"the prompt ranges of reports {i} and {j} {what}: "
                f"prompts up to #{end - 1}, then from #{start}"
            )
    ordered = [reports[i] for _, _, i in spans]
    labels = [row["method"] for row in ordered[0]["rows"]]
    common = [lab for lab in labels if all(any(r["method"] == lab for r in rep["rows"]) for rep in ordered)]
    if len(common) < 2:
        raise ValueError(f"no method row is in every report (the first has {labels[1:]})")
    rows = [
        _merge_rows(lab, [(rep, next(r for r in rep["rows"] if r["method"] == lab)) for rep in ordered])
        for lab in common
    ]
    dropped = sorted({r["method"] for rep in ordered for r in rep["rows"]} - set(common))
    first = spans[0][0]
    return {
        "call": ordered[0]["call"],
        "seed": ordered[0]["seed"],
        "device": ordered[0]["device"],
        "prompts_asked": spans[-1][1] - first,
        "first_prompt": first,
        "parts": [{"first_prompt": start, "prompts": end - start} for start, end, _ in spans],
        "dropped": dropped,
        "rows": rows,
    }


def format_table(rows: list[dict]) -> str:
    """A markdown table of :func:`quality_table` rows."""

    def num(v, fmt):
        if v is None:
            return "-"
        if isinstance(v, float) and math.isinf(v):
            return "inf"
        return format(v, fmt)

    lines = [
        "| method | knobs | prompts | PSNR dB (mean / worst frame) | SSIM | adherence | density "
        "| plan density | s / clip (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "-"
        lines.append(
            f"| {r['method']} | {knobs} | {r['prompts']} "
            f"| {num(r['psnr'], '.2f')} / {num(r['psnr_min_frame'], '.2f')}"
            f" | {num(r['ssim'], '.4f')} | {num(r['adherence'], '.3f')} | {num(r['density'], '.3f')}"
            f" | {num(r.get('plan_density'), '.3f')} | {num(r['seconds'], '.2f')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dit_accel.pipelines.quality",
        description="PSNR/SSIM vs dense and prompt adherence of dit_accel methods on the tiny model.",
    )
    parser.add_argument("--methods", nargs="+", help='specs like "window:density=0.25,dense_steps=2"')
    parser.add_argument("--prompts", type=int, default=8, help="number of held-out grammar prompts")
    parser.add_argument("--first-prompt", type=int, default=0, help="index of the first held-out prompt run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--weights", help="weights folder of the tiny model (default: the package's)")
    parser.add_argument("--out", help="write the markdown table here (and the rows as JSON next to it)")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="instead of rendering: one table over the prompts of several runs' JSON (same setup, adjoining "
        "prompt ranges), written to --out",
    )
    args = parser.parse_args(argv)
    if args.merge:
        if args.methods or not args.out:
            parser.error("--merge takes JSON files and --out, not --methods")
        try:
            merged = merge_reports([_read_json(path) for path in args.merge])
        except (OSError, ValueError, KeyError) as e:
            parser.error(f"--merge: {e}")
        merged["merged_from"] = list(args.merge)
        _write_report(args.out, merged)
        print(report_text(merged))
        return 0
    if not args.methods:
        parser.error("--methods is required (or --merge)")

    from .tiny_video.data import held_out_prompts
    from .tiny_video.model import load_tiny_video_pipeline, render_defaults

    defaults = render_defaults(args.device)
    call_kwargs = {
        "num_frames": args.frames or defaults["frames"],
        "height": args.height or defaults["height"],
        "width": args.width or defaults["width"],
        "num_inference_steps": args.steps or defaults["steps"],
        "guidance_scale": args.guidance,
    }
    pipe = load_tiny_video_pipeline(device=args.device, weights_dir=args.weights)
    pipe.set_progress_bar_config(disable=True)
    if not 0 <= args.first_prompt < args.prompts:
        parser.error(f"--first-prompt must be in [0, --prompts), got {args.first_prompt}")
    prompts = [p for p, _ in held_out_prompts(args.prompts)][args.first_prompt :]
    methods = {}
    for spec in args.methods:
        name, knobs = parse_method_spec(spec)
        methods[spec] = {"method": name, **knobs}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"

    def report(rows):
        return {
            "call": call_kwargs,
            "seed": args.seed,
            "device": device,
            "prompts_asked": len(prompts),
            "first_prompt": args.first_prompt,
            "rows": rows,
        }

    def write(rows):
        # rewritten after every prompt: a stopped run leaves the table over the prompts it finished
        _write_report(args.out, report(rows))

    rows = quality_table(
        pipe, prompts, methods, seed=args.seed, call_kwargs=call_kwargs, on_prompt=write if args.out else None
    )
    print(report_text(report(rows)))
    return 0


def report_text(report: dict) -> str:
    """The markdown a run writes (``--out``): a line saying what was rendered, then the table."""
    call = report["call"]
    geometry = f"{call['num_frames']}x{call['height']}x{call['width']}"
    which = f" from #{report['first_prompt']}" if report["first_prompt"] else ""
    merged = f", merged from {len(report['parts'])} runs" if "parts" in report else ""
    return (
        f"Embedded tiny model, {geometry}, {call['num_inference_steps']} steps, guidance "
        f"{call['guidance_scale']}, seed {report['seed']}, {report['rows'][0]['prompts']} held-out "
        f"prompts{which}, {report['device']}{merged}.\n\n" + format_table(report["rows"])
    )


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write_report(path: str, report: dict) -> None:
    """The markdown table at ``path`` and the report as JSON beside it (same name, ``.json``)."""
    with open(path, "w") as f:
        f.write(report_text(report) + "\n")
    with open(path.rsplit(".", 1)[0] + ".json", "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
