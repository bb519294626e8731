"""How long the demo's jobs take: Generate and Compare with dense at the page's default geometry for a
device, through the same :class:`~.engine.Engine` the page uses (render, video files, pattern file, pictures).

    python -m dit_accel.demo.timing --device cuda --out demo_timing.json
    python -m dit_accel.demo.timing --device cpu --repeats 2

Per preset: the first job (on a GPU it includes compiling dit_accel's kernels for this geometry) and the
median of the following ones; for each, the whole job (what the page waits for) and the render times inside
it. Every comparison's PSNR is checked finite or infinite (never NaN) before its times are reported.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import torch

__all__ = ["main", "time_jobs"]

PROMPT = "a large red circle moving right on a black background"


def _job(engine, request, compare: bool) -> dict:
    t0 = time.perf_counter()
    result = engine.run(request, compare=compare)
    total = time.perf_counter() - t0
    if compare and result.psnr_mean is not None and math.isnan(result.psnr_mean):
        raise RuntimeError(f"{request.preset}: the comparison's PSNR is NaN; no times reported")
    row = {"job_s": total, "accelerated_s": result.seconds, "density": result.density}
    if compare:
        row.update(
            dense_s=result.seconds_dense, speedup=result.speedup, psnr=result.psnr_mean, ssim=result.ssim_mean
        )
    return row


def _summary(rows: list[dict]) -> dict:
    first, rest = rows[0], rows[1:] or rows[:1]
    keys = [k for k in first if isinstance(first[k], (int, float))]
    return {"first": first, "median": {k: statistics.median(r[k] for r in rest) for k in keys}, "runs": rows}


def time_jobs(device: str, presets, repeats: int = 3, geometry: dict | None = None) -> dict:
    """Time Generate and Compare jobs for each preset (see the module docstring)."""
    from .engine import Engine
    from .requests import parse_request

    t0 = time.perf_counter()
    engine = Engine(device=device)
    engine.load("embedded")
    load_s = time.perf_counter() - t0
    d = {**engine.defaults(), **(geometry or {})}
    out = {
        "device": torch.cuda.get_device_name()
        if engine.device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "geometry": d,
        "load_and_warm_up_s": load_s,
        "presets": {},
    }
    for preset in presets:
        request = parse_request(PROMPT, "embedded", preset, **d)
        generate = [_job(engine, request, False) for _ in range(repeats)]
        compare = [_job(engine, request, True) for _ in range(repeats)]
        out["presets"][preset] = {"generate": _summary(generate), "compare": _summary(compare)}
    return out


def _table(result: dict) -> str:
    g = result["geometry"]
    lines = [
        f"{result['device']}, {g['frames']} frames x {g['height']} x {g['width']}, {g['steps']} steps "
        f"(load and warm-up {result['load_and_warm_up_s']:.1f} s)",
        "",
        "| preset | generate: job s (first) | compare: job s (first) | dense s | accelerated s | speedup "
        "| PSNR dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, r in result["presets"].items():
        gen, cmp = r["generate"], r["compare"]
        m = cmp["median"]
        lines.append(
            f"| {preset} | {gen['median']['job_s']:.2f} ({gen['first']['job_s']:.2f}) "
            f"| {m['job_s']:.2f} ({cmp['first']['job_s']:.2f}) | {m['dense_s']:.2f} "
            f"| {m['accelerated_s']:.2f} | {m['speedup']:.2f} | {m['psnr']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dit_accel.demo.timing", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--presets", nargs="+", default=["balanced", "quality", "fast"])
    parser.add_argument(
        "--repeats", type=int, default=3, help="jobs of each kind per preset (median of 2..N)"
    )
    for name in ("frames", "height", "width", "steps"):
        parser.add_argument(f"--{name}", type=int, help="instead of the page's default for the device")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    geometry = {k: getattr(args, k) for k in ("frames", "height", "width", "steps") if getattr(args, k)}
    result = time_jobs(args.device, args.presets, max(args.repeats, 1), geometry)
    print(_table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
