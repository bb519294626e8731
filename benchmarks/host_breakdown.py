"""Where a sparse attention call's host time goes on the embedded model, without a profiler.

The embedded transformer at its GPU geometry (2,496 tokens, 6 layers) runs the 30-step schedule with CFG as
the pipeline calls it (``cache_context(context, step_index=i)``), outside the pipeline (no VAE, text encoder
or scheduler), once per configuration per round, rounds interleaved (median of ``--rounds``). Per
configuration: wall time per transformer forward (synchronised at the end of the 60 forwards) and host time
per forward (before that synchronisation), and, from ``perf_counter`` wrappers around three nested layers,
the host time per call of

- ``Runtime.attend``: everything dit_accel does for one attention call (method, plan cache, stats, kernels);
- ``ops._sparse_attention_impl``: the launcher of the sparse kernel (outputs, plan arguments, launch);
- ``triton_common.launch``: the launch itself (config lookup, exact key, the compiled kernel's C launcher).

The wrappers cost about a microsecond each. CPU smoke run (the CPU geometry, 2 steps, 1 round; the kernels
there run through the torch reference, so the launcher layers stay empty):

    python benchmarks/host_breakdown.py --smoke --out /tmp/host_breakdown.json
    source benchmarks/gpu_env.sh && python3 benchmarks/host_breakdown.py --out PATH.json    # about 1 min
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import versions  # noqa: E402

CONFIGS = {
    "stock": None,
    "dense": {"method": "dense"},
    "window_0.25_no_warmup": {"method": "window", "density": 0.25, "dense_steps": 0},
    "radial": {"method": "radial"},
    "balanced": {"method": "adaspa", "sparsity": 0.8},
}
LAYERS = ("runtime.attend", "ops._sparse_attention_impl", "triton_common.launch")


def _install_timers(acc: dict) -> None:
    """Wrap the three layers with host-time accumulators (``acc[name] = [seconds, calls]``)."""
    from dit_accel.kernels import ops, triton_attention, triton_common
    from dit_accel.processors import base

    def wrap(owner, attr: str, name: str):
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                slot = acc.setdefault(name, [0.0, 0])
                slot[0] += time.perf_counter() - t0
                slot[1] += 1

        setattr(owner, attr, timed)
        return timed

    wrap(base.Runtime, "attend", LAYERS[0])
    wrap(ops, "_sparse_attention_impl", LAYERS[1])  # looked up as a module global at each call
    triton_attention.launch = wrap(triton_common, "launch", LAYERS[2])  # imported by name


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, the CPU geometry, 2 steps, 1 round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    import dit_accel
    from dit_accel.pipelines.quality import render_frames
    from dit_accel.pipelines.tiny_video.model import load_tiny_video_pipeline, render_defaults

    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA device (use --smoke on CPU)")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    steps, rounds = (2, 1) if args.smoke else (30, args.rounds)
    pipe = load_tiny_video_pipeline(device=device)
    pipe.set_progress_bar_config(disable=True)
    geo = render_defaults(device)
    transformer = pipe.transformer
    captured = {}

    def grab(module, args, kwargs):  # the transformer's keyword arguments of the pipeline's first call
        captured.setdefault("kwargs", dict(kwargs))

    hook = transformer.register_forward_pre_hook(grab, with_kwargs=True)
    render_frames(pipe, "a red ball moves left", 0, num_frames=geo["frames"], height=geo["height"],
                  width=geo["width"], num_inference_steps=2)  # fmt: skip
    hook.remove()
    inputs = {k: v for k, v in captured["kwargs"].items() if k not in ("timestep", "return_dict")}

    @torch.inference_mode()
    def schedule():
        for i in range(steps):
            for context in ("cond", "uncond"):
                with transformer.cache_context(context, step_index=i, num_inference_steps=steps):
                    t = torch.tensor([999.0 - i * 999.0 / steps], device=device)
                    transformer(**inputs, timestep=t, return_dict=False)

    acc: dict = {}
    _install_timers(acc)
    samples = {name: [] for name in CONFIGS}
    for _ in range(rounds):  # interleaved: a slow stretch of the host hits every configuration alike
        for name, knobs in CONFIGS.items():
            handle = dit_accel.apply(transformer, **knobs) if knobs else None
            try:
                schedule()  # warm-up: autotuning, plan building, searches of a first run
                sync()
                acc.clear()
                t0 = time.perf_counter()
                schedule()
                host = time.perf_counter() - t0
                sync()
                wall = time.perf_counter() - t0
            finally:
                if handle is not None:
                    dit_accel.remove(transformer)
            samples[name].append((wall, host, {k: tuple(v) for k, v in acc.items()}))
    forwards = steps * 2
    report = {
        "benchmark": "host_breakdown",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": versions(),
        "geometry": {k: list(v.shape) for k, v in inputs.items() if isinstance(v, torch.Tensor)},
        "steps": steps,
        "rounds": rounds,
        "configs": {},
    }
    for name, runs in samples.items():
        row = {
            "wall_ms_per_forward": statistics.median(w for w, _, _ in runs) / forwards * 1e3,
            "host_ms_per_forward": statistics.median(h for _, h, _ in runs) / forwards * 1e3,
        }
        for layer in LAYERS:
            if layer in runs[0][2]:
                calls = runs[0][2][layer][1]
                row[layer] = {
                    "calls": calls,
                    "us_per_call": statistics.median(a[layer][0] for *_, a in runs if layer in a)
                    / calls
                    * 1e6,
                }
        report["configs"][name] = row
        print(
            f"{name:24s} {row['wall_ms_per_forward']:7.3f} ms/forward "
            f"(host {row['host_ms_per_forward']:.3f})  "
            + "  ".join(
                f"{layer} {row[layer]['us_per_call']:.0f} us x {row[layer]['calls']}"
                for layer in LAYERS
                if layer in row
            ),  # fmt: skip
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
