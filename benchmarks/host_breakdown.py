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

Per step kind (the method's phase of each step: dense, refresh, corrected, sparse, ...): the host time per
forward and its span on the GPU's timeline (CUDA events around each forward; host-bound forwards span about
their host time), and the median host time of one ``Runtime.attend`` call of that kind (the kind its stats
record got). ``--gpu-busy``: one more schedule per configuration under torch.profiler, for the GPU's kernel
time per forward and the busiest kernels (a forward whose kernel time is well below its host time waits for
the host, not the GPU). ``--sync-stacks``: one more schedule per configuration under
``torch.cuda.set_sync_debug_mode("warn")``, counting each host synchronisation by the innermost dit_accel
frame that caused it (``file:line function``).

Around the model's own modules (the same code in every configuration): host time per forward in
``WanTransformerBlock.forward``, the self-attention module (``attn1``, which holds dit_accel's processor) and
the cross-attention module (``attn2``, stock in every configuration); what a forward spends outside ``attn1``
should not depend on the method. Python's garbage collector: collections per forward by generation and the
host time in them (``gc.callbacks``); ``--gc-off`` times one more schedule per configuration and round with
the collector disabled.

The wrappers cost about a microsecond each. CPU smoke run (the CPU geometry, 2 steps, 1 round; the kernels
there run through the torch reference, so the launcher layers stay empty):

    python benchmarks/host_breakdown.py --smoke --out /tmp/host_breakdown.json
    source benchmarks/gpu_env.sh && python3 benchmarks/host_breakdown.py --out PATH.json    # about 1 min
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import versions, wan_preset  # noqa: E402

# host_breakdown_nvidia_h200.json (2026-12-04) calls adaspa 0.8 "balanced": the preset of the time.
CONFIGS = {
    "stock": None,
    "dense": {"method": "dense"},
    "window_0.25_no_warmup": {"method": "window", "density": 0.25, "dense_steps": 0},
    "radial": {"method": "radial"},
    "adaspa_0.8": {"method": "adaspa", "sparsity": 0.8},
    "balanced": wan_preset("balanced"),
    "fast": wan_preset("fast"),
    # balanced and fast with their refreshes on the one-pass kernel, which "auto" takes only above
    # AUTO_SPLIT_BELOW (dit_accel/methods/rettention.py; these presets refresh on the two-pass path)
    "balanced_fused": {**wan_preset("balanced"), "refresh": "fused"},
    "fast_fused": {**wan_preset("fast"), "refresh": "fused"},
}
LAYERS = ("runtime.attend", "ops._sparse_attention_impl", "triton_common.launch")
MODEL_LAYERS = ("wan.block", "wan.attn1", "wan.attn2")


def _install_timers(acc: dict, by_kind: dict) -> None:
    """Wrap the three layers with host-time accumulators (``acc[name] = [seconds, calls]``); each
    ``Runtime.attend`` call's seconds also go to ``by_kind[kind]`` (the kind its stats record got)."""
    from dit_accel.kernels import ops, triton_attention, triton_common
    from dit_accel.processors import base

    def add(name: str, t0: float) -> float:
        slot = acc.setdefault(name, [0.0, 0])
        dt = time.perf_counter() - t0
        slot[0] += dt
        slot[1] += 1
        return dt

    def wrap(owner, attr: str, name: str):
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                add(name, t0)

        setattr(owner, attr, timed)
        return timed

    attend = base.Runtime.attend

    @functools.wraps(attend)
    def attend_timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return attend(self, *args, **kwargs)
        finally:
            dt = add(LAYERS[0], t0)
            if self.records:
                by_kind.setdefault(self.records[-1].kind, []).append(dt)

    base.Runtime.attend = attend_timed
    wrap(ops, "_sparse_attention_impl", LAYERS[1])  # looked up as a module global at each call
    triton_attention.launch = wrap(triton_common, "launch", LAYERS[2])  # imported by name

    from diffusers.models.transformers import transformer_wan

    wrap(transformer_wan.WanTransformerBlock, "forward", MODEL_LAYERS[0])
    attn_forward = transformer_wan.WanAttention.forward

    @functools.wraps(attn_forward)
    def attn_timed(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return attn_forward(self, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            add(MODEL_LAYERS[1 if encoder_hidden_states is None else 2], t0)

    transformer_wan.WanAttention.forward = attn_timed


def _install_gc_clock(acc: dict) -> None:
    """Count the collector's runs by generation (``acc["gc.gen<N>"] = [seconds, runs]``)."""
    started = []

    def clock(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            slot = acc.setdefault(f"gc.gen{info['generation']}", [0.0, 0])
            slot[0] += time.perf_counter() - started.pop()
            slot[1] += 1

    gc.callbacks.append(clock)


def _events(device) -> tuple | None:
    """A started pair of timing events on CUDA (the second recorded by the caller), else None."""
    if device.type != "cuda":
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    return start, end


def _gpu_busy(run, forwards: int) -> dict:
    """The GPU's kernel time per forward during ``run()`` (``forwards`` forwards) and the busiest kernels,
    from torch.profiler's CUDA activity."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = sorted(
        (
            (e.self_device_time_total, e.key, e.count)
            for e in prof.key_averages()
            if e.self_device_time_total > 0
        ),
        reverse=True,
    )
    return {
        "gpu_busy_ms_per_forward": sum(t for t, _, _ in rows) / forwards / 1e3,
        "gpu_top_kernels": [
            {"kernel": key[:100], "ms_per_forward": t / forwards / 1e3, "calls_per_forward": n / forwards}
            for t, key, n in rows[:8]
        ],
    }


def _step_kinds(handle, steps: int) -> list[str]:
    """Each step's kind in the handle's latest run: the kind most of its calls had (stock: dense)."""
    kinds = ["dense"] * steps
    if handle is not None:
        per_step: dict[int, Counter] = {}
        for r in handle.stats().records:
            if 0 <= r["step"] < steps:
                per_step.setdefault(r["step"], Counter())[r["kind"]] += 1
        for step, counts in per_step.items():
            kinds[step] = counts.most_common(1)[0][0]
    return kinds


def _sync_sites(run) -> dict[str, int]:
    """Host synchronisations during ``run()``, counted by the innermost dit_accel frame on the stack."""
    import traceback
    import warnings

    sites: Counter = Counter()
    root = str(Path(__file__).resolve().parents[1])

    def show(message, category, filename, lineno, file=None, line=None):
        ours = [
            f
            for f in traceback.extract_stack()
            if f.filename.startswith(root) and "/benchmarks/" not in f.filename
        ]
        at = ours[-1] if ours else None
        sites[f"{Path(at.filename).name}:{at.lineno} {at.name}" if at else "elsewhere"] += 1

    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return dict(sites.most_common())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, the CPU geometry, 2 steps, 1 round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--sync-stacks", action="store_true", help="count host syncs by their dit_accel frame")
    ap.add_argument("--gc-off", action="store_true", help="also time a schedule with the collector disabled")
    ap.add_argument(
        "--gpu-busy", action="store_true", help="one schedule per configuration under torch.profiler"
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    names = args.configs.split(",") if args.configs else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
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
    def schedule(forwards=None):
        """The 30-step CFG schedule; ``forwards``: a list to get (step, host seconds, events) per forward."""
        for i in range(steps):
            for context in ("cond", "uncond"):
                with transformer.cache_context(context, step_index=i, num_inference_steps=steps):
                    t = torch.tensor([999.0 - i * 999.0 / steps], device=device)
                    if forwards is None:
                        transformer(**inputs, timestep=t, return_dict=False)
                        continue
                    events = _events(device)
                    t0 = time.perf_counter()
                    transformer(**inputs, timestep=t, return_dict=False)
                    host = time.perf_counter() - t0
                    if events:
                        events[1].record()
                    forwards.append((i, host, events))

    acc: dict = {}
    by_kind: dict = {}
    _install_timers(acc, by_kind)
    _install_gc_clock(acc)
    samples = {name: [] for name in names}
    attend_kinds = {name: {} for name in names}  # kind -> [median seconds per call, one per round]
    busy = {}
    per_kind = {name: {} for name in names}  # kind -> [(host ms, span ms)] per forward, over rounds
    gc_off = {name: [] for name in names}  # seconds per schedule with the collector disabled
    syncs = {}
    for r in range(rounds):  # interleaved: a slow stretch of the host hits every configuration alike
        for name in names:
            knobs = CONFIGS[name]
            handle = dit_accel.apply(transformer, **knobs) if knobs else None
            try:
                schedule()  # warm-up: autotuning, plan building, searches of a first run
                sync()
                acc.clear()
                by_kind.clear()
                t0 = time.perf_counter()
                schedule()
                host = time.perf_counter() - t0
                sync()
                wall = time.perf_counter() - t0
                layers = {k: tuple(v) for k, v in acc.items()}
                for kind, seconds in by_kind.items():
                    attend_kinds[name].setdefault(kind, []).append((statistics.median(seconds), len(seconds)))
                forwards = []
                schedule(forwards)  # the same again, timed per forward
                sync()
                kinds = _step_kinds(handle, steps)
                for step, fwd_host, events in forwards:
                    span = events[0].elapsed_time(events[1]) if events else fwd_host * 1e3
                    per_kind[name].setdefault(kinds[step], []).append((fwd_host * 1e3, span))
                if args.gc_off:
                    gc.collect()
                    gc.disable()
                    try:
                        t0 = time.perf_counter()
                        schedule()
                        sync()
                        gc_off[name].append(time.perf_counter() - t0)
                    finally:
                        gc.enable()
                if args.sync_stacks and r == 0 and handle is not None and device.type == "cuda":
                    syncs[name] = _sync_sites(schedule)
                if args.gpu_busy and r == 0 and device.type == "cuda":
                    busy[name] = _gpu_busy(schedule, steps * 2)
            finally:
                if handle is not None:
                    dit_accel.remove(transformer)
            samples[name].append((wall, host, layers))
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
        for layer in MODEL_LAYERS + tuple(sorted(k for k in runs[0][2] if k.startswith("gc."))):
            if layer in runs[0][2]:
                row[layer] = {
                    "calls_per_forward": runs[0][2][layer][1] / forwards,
                    "ms_per_forward": statistics.median(a.get(layer, (0.0, 0))[0] for *_, a in runs)
                    / forwards
                    * 1e3,
                }
        if attend_kinds[name]:
            row["runtime.attend_by_kind"] = {
                kind: {
                    "calls": v[0][1],
                    "us_per_call_median": statistics.median(m for m, _ in v) * 1e6,
                }
                for kind, v in attend_kinds[name].items()
            }
        if name in busy:
            row.update(busy[name])
        if "wan.attn1" in row:
            row["outside_attn1_host_ms_per_forward"] = (
                row["host_ms_per_forward"] - row["wan.attn1"]["ms_per_forward"]
            )
        if gc_off[name]:
            row["wall_ms_per_forward_gc_off"] = statistics.median(gc_off[name]) / forwards * 1e3
        row["kinds"] = {
            kind: {
                "forwards_per_run": len(v) // rounds,
                "host_ms_per_forward": statistics.median(h for h, _ in v),
                "gpu_span_ms_per_forward": statistics.median(g for _, g in v),
            }
            for kind, v in per_kind[name].items()
        }
        if name in syncs:
            row["sync_sites"] = syncs[name]
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
        print(
            "    "
            + "  ".join(
                f"{layer} {row[layer]['ms_per_forward']:.3f} ms x{row[layer]['calls_per_forward']:.2f}"
                for layer in row
                if layer.startswith(("wan.", "gc."))
            )
            + (f"  outside attn1 {row['outside_attn1_host_ms_per_forward']:.3f} ms"
               if "outside_attn1_host_ms_per_forward" in row else "")
            + (f"  gc off {row['wall_ms_per_forward_gc_off']:.3f} ms/forward"
               if "wall_ms_per_forward_gc_off" in row else ""),
            flush=True,
        )  # fmt: skip
        if "runtime.attend_by_kind" in row:
            print(
                "    runtime.attend by kind: "
                + "  ".join(
                    f"{kind} {v['us_per_call_median']:.1f} us x {v['calls']}"
                    for kind, v in row["runtime.attend_by_kind"].items()
                ),
                flush=True,
            )
        if "gpu_busy_ms_per_forward" in row:
            print(f"    GPU busy {row['gpu_busy_ms_per_forward']:.3f} ms/forward", flush=True)
        for kind, k in row["kinds"].items():
            print(
                f"    {kind:12s} x{k['forwards_per_run']:3d}  host {k['host_ms_per_forward']:.3f} ms  "
                f"gpu span {k['gpu_span_ms_per_forward']:.3f} ms",
                flush=True,
            )
        for site, n in row.get("sync_sites", {}).items():
            print(f"    sync x{n:4d}  {site}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
