"""The CPU path of ``backend="torch"`` (``kernels/torch_sparse.py``) against the fp32 reference it replaced,
on the embedded model: one attention call of each kind, and whole renders of stock and every preset.

Per call (q, k, v and plans captured from a real render, so the plans are the presets' own): the sparse
call, the dense call with LSE and the block mass of a search step, each through the reference and through
the CPU path, beside stock SDPA on the same q, k, v (medians of ``--call-repeats``). Whole renders:
``dit_accel.pipelines.bench.run`` (the ``dit-accel bench`` code) twice, once with the CPU path and once
with it turned off (``torch_sparse.available`` patched to False), with stock's render in each.

    python3 benchmarks/bench_cpu_path.py --out benchmarks/results/cpu_path_2cores.json     # ~15 min, 2 cores

``--smoke``: a 2-step render at a tiny size (``tests/test_bench_cpu_path.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import versions, write_json  # noqa: E402

import dit_accel.methods.base as methods_base  # noqa: E402
from dit_accel.kernels import reference, torch_sparse  # noqa: E402
from dit_accel.pipelines import bench, load_pipeline, wrap  # noqa: E402

PROMPT = "a large red circle moving right on a black background"
PRESETS = ("quality", "balanced", "fast", "rettention")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def capture_call(pipe, preset: str, call: dict) -> dict | None:
    """q, k, v (B, H, S, D) and the plan of the first sparse call of a render with ``preset`` (a preset name
    or a method spec)."""
    captured = []
    original = methods_base.block_sparse_attention

    def spy(q, k, v, plan, **kwargs):
        if not captured and kwargs.get("correction") is None:
            qh, kh, vh = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v))
            if kwargs.get("layout") == "bhsd":
                qh, kh, vh = (x.detach().contiguous() for x in (q, k, v))
            captured.append({"q": qh, "k": kh, "v": vh, "plan": plan})
        return original(q, k, v, plan, **kwargs)

    name, knobs = bench.parse_config(preset)
    accel = wrap(pipe, name, **knobs)
    try:
        with mock.patch.object(methods_base, "block_sparse_attention", spy):
            accel(**call, output_type="np", generator=torch.Generator().manual_seed(0))
    finally:
        accel.remove()
    return captured[0] if captured else None


def time_calls(c: dict, repeats: int) -> dict:
    q, k, v, plan = c["q"], c["k"], c["v"], c["plan"]
    scale = q.shape[-1] ** -0.5
    _, lse = torch_sparse.dense_attention(q, k, v, scale)
    bq, bk = plan.block_q, plan.block_k
    row = {
        "shape": list(q.shape),
        "block": [bq, bk],
        "plan_density": plan.density(),
        "stock_sdpa_ms": _median_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), repeats
        ),  # noqa: E501
    }
    pairs = {
        "sparse": (
            lambda: reference.attention_reference(q, k, v, plan, scale),
            lambda: torch_sparse.sparse_attention(q, k, v, plan, scale),
        ),
        "dense_lse": (
            lambda: reference.attention_reference(q, k, v, None, scale),
            lambda: torch_sparse.dense_attention(q, k, v, scale),
        ),
        "block_mass": (
            lambda: reference.block_mass_reference(q, k, lse, bq, bk, scale),
            lambda: torch_sparse.block_mass(q, k, lse, bq, bk, scale),
        ),
    }
    for name, (ref, fast) in pairs.items():
        row[f"{name}_reference_ms"] = _median_ms(ref, repeats)
        row[f"{name}_cpu_path_ms"] = _median_ms(fast, repeats)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--call-repeats", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="timed renders per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 5 x 32 x 32")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.smoke:
        args.frames, args.height, args.width, args.steps, args.call_repeats = 5, 32, 32, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    call = {"prompt": PROMPT, "num_frames": args.frames, "height": args.height, "width": args.width,
            "num_inference_steps": args.steps}  # fmt: skip
    pipe = load_pipeline("embedded", device="cpu")
    report = {
        "benchmark": "bench_cpu_path",
        "call": call,
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "calls": {},
        "renders": {},
    }

    def save():
        if args.out:
            write_json(args.out, report)

    for preset in presets:
        captured = capture_call(pipe, preset, call)
        if captured is not None:
            report["calls"][preset] = time_calls(captured, args.call_repeats)
            print(
                preset,
                {k: round(v, 2) if isinstance(v, float) else v for k, v in report["calls"][preset].items()},
            )  # noqa: E501
            save()
    for path in ("cpu_path", "reference"):
        off = mock.patch.object(torch_sparse, "available", lambda *a: False)
        with off if path == "reference" else contextlib.nullcontext():
            rows = bench.run(pipe, presets, warmup=0, repeats=args.repeats, **call)
        report["renders"][path] = [
            {
                "name": r.name,
                "seconds": r.seconds,
                "all_seconds": r.all_seconds,
                "speedup_vs_stock": r.speedup,
                "psnr_vs_stock": r.psnr_mean,
                "error": r.error,
            }  # fmt: skip
            for r in rows
        ]
        print(path, [(r.name, round(r.seconds or 0, 2), round(r.speedup or 0, 2)) for r in rows])
        save()
    return report


if __name__ == "__main__":
    main()
