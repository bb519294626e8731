"""Where a clip's time goes on the embedded model (2,496 tokens, 6 layers, 30 steps with CFG: 360 attention
calls), dense against each sparse method, and what one attention call costs the host.

1. **Renders.** The embedded pipeline at its GPU geometry (49 x 192 x 256), one prompt, per configuration
   (``stock``: no dit_accel; ``dense``: every call through dit_accel's processors on the stock op; then sparse
   methods, each also as ``<name>@jit``: every Triton launch through Triton's own launcher
   (``JITFunction.run``, its argument binder included) instead of the recorded compiled kernel's launcher, and
   no call cache: the launch path before direct launches): two untimed renders each, then ``--repeats`` rounds
   of one timed render per configuration (interleaved, so a slow stretch of the host hits all alike; median),
   then one render under ``torch.profiler``: the host's busiest ops (self CPU time), how many kernels were
   launched, how many host synchronisations happened (``aten::_local_scalar_dense``: ``.item()``,
   ``bool(tensor)``), and the GPU's busy time against the wall; then one under cProfile: the Python functions
   with the most own time.
   ``<name>@uncached`` (only when named in ``--configs``): ``<name>`` without the call cache (repeated
   attention and rotary calls through the checks and the launcher, as before the cache;
   ``docs/kernels.md#repeated-calls``), in the same rounds.
   ``<name>+graphs`` (only when named in ``--configs``): ``<name>`` with ``cuda_graphs=True``, whole
   forwards replayed as CUDA graphs. Before timing, each is rendered once against an eager ``<name>``
   render: the largest frame difference and how its forwards ran are recorded, and a row over
   ``GRAPH_TOLERANCE`` or without a replayed forward is marked failed and not timed.
   ``<name>+blocks`` and ``<name>+graphs+blocks`` (only when named in ``--configs``): with
   ``fuse_blocks=True``, each block's elementwise work in one Triton pass per step. Before timing, each is
   rendered once against a render without ``fuse_blocks``: the largest frame difference and the PSNR
   between the two are recorded (the fused LayerNorms may differ in the last bit; the clips should not).
2. **One attention call.** At the model's attention shape (1, 6, 2,496, 64; bf16): cuDNN SDPA, our
   ``dense_attention(backend="triton")`` and ``block_sparse_attention`` at plan densities 1.0 / 0.5 / 0.25
   (at 0.5 also the bare launcher, and both through Triton's own launcher):
   the host time to issue a call (100 calls, no synchronisation between them, divided by 100) and the
   device time per call (the same 100 calls, synchronised at the end), median of 7 interleaved rounds;
   then the bare launcher under cProfile. This part runs first (``--one-call-only``: only this part).

The JSON is written after each part and each configuration, so a run cut short keeps what finished.
``--renders-only --no-profile --no-jit --configs dense,radial --repeats 15``: only the timed renders of those
configurations, each with its ratio to ``dense`` per round (median) and the rounds it was at least as fast.

    source benchmarks/gpu_env.sh && python3 benchmarks/profile_embedded.py --out PATH.json     # about 4 min

CPU smoke run (the CPU geometry, 2 steps; no profiler table for the GPU):

    python benchmarks/profile_embedded.py --smoke --out /tmp/profile_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import gpu_tag, versions, wan_preset  # noqa: E402


def _rettention_at(*fractions):
    return {"method": "rettention", "density": 0.05, "dense_steps": 0.1, "refresh_at": fractions}


CONFIGS = {
    "stock": None,
    "dense": {"method": "dense"},
    # the Wan presets as the table has them now (results before 2026-12-05 name adaspa 0.8 "balanced")
    "quality": wan_preset("quality"),
    "balanced": wan_preset("balanced"),
    "fast": wan_preset("fast"),
    "adaspa_0.8": {"method": "adaspa", "sparsity": 0.8},
    "radial": {"method": "radial"},
    "rettention": {"method": "rettention"},
    # re-ttention's lean schedule (the balanced preset) on 128- and 16-token blocks; the preset's own blocks
    # at this size are 16 (window.py). profile_embedded_lean_nvidia_h200.json, run before that cap, calls
    # the 128-token one "rettention_lean".
    "rettention_lean_128": {**wan_preset("balanced"), "block_q": 128},
    "rettention_lean_16": {**wan_preset("balanced"), "block_q": 16},
    "window_0.25_no_warmup": {"method": "window", "density": 0.25, "dense_steps": 0},
    # re-ttention with refreshes named as fractions of the run (docs/rettention.md, "Where the full steps go")
    "rettention_front3": _rettention_at(0.2, 0.4),
    "rettention_front2": _rettention_at(0.3),
    # five-refresh candidates for the balanced preset (bench_e2e rows rettention_window_0.05_lean5a / _lean5b)
    "rettention_lean5a": _rettention_at(0.2, 0.3, 0.5, 0.7),
    "rettention_lean5b": _rettention_at(0.2, 0.4, 0.6, 0.8),
    # balanced and fast with their refreshes on the one-pass kernel, which "auto" takes only above
    # AUTO_SPLIT_BELOW (dit_accel/methods/rettention.py; these presets refresh on the two-pass path)
    "balanced_fused": {**wan_preset("balanced"), "refresh": "fused"},
    "fast_fused": {**wan_preset("fast"), "refresh": "fused"},
}
# The same configurations with whole forwards replayed as CUDA graphs (dit_accel.graphs).
CONFIGS.update(
    {f"{name}+graphs": {**knobs, "cuda_graphs": True} for name, knobs in list(CONFIGS.items()) if knobs}
)
# ... and with fuse_blocks=True: each block's elementwise work in one pass per step (docs/kernels.md).
CONFIGS.update(
    {f"{name}+blocks": {**knobs, "fuse_blocks": True} for name, knobs in list(CONFIGS.items()) if knobs}
)
GRAPH_TOLERANCE = 1e-2  # max |frame difference| (frames in [0, 1]) of a graphed render against its eager one
SYNC_OPS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize")
LAUNCH_OPS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def launch_through_triton():
    """The launch path before direct launches (for side-by-side timing): every Triton call through
    ``JITFunction.run`` (argument binding, specialisation, cache lookup) with the recorded config, and no
    call cache (which came after)."""
    from dit_accel.kernels import triton_common

    saved = triton_common._DIRECT_ON
    triton_common._DIRECT_ON = False
    try:
        with without_call_cache():
            yield
    finally:
        triton_common._DIRECT_ON = saved


@contextlib.contextmanager
def without_call_cache():
    """Every sparse call through the checks and the launcher (``ops._CALL_CACHE`` off), as before repeated
    calls replayed their recorded launch."""
    from dit_accel.kernels import ops

    saved = ops._CALL_CACHE
    ops._CALL_CACHE = False
    try:
        yield
    finally:
        ops._CALL_CACHE = saved


UNCACHED = "@uncached"


def _variants(names=None, jit: bool = True):
    """(row name, knobs, context) per configuration (``names``: those only; ``<name>@uncached``: that
    configuration without the call cache); with ``jit`` sparse ones also on the old launch path."""
    for name, knobs in CONFIGS.items():
        if (names is None and not name.endswith(("+graphs", "+blocks"))) or (
            names is not None and name in names
        ):
            yield name, knobs, contextlib.nullcontext
            if jit and knobs and knobs["method"] != "dense" and not knobs.get("cuda_graphs"):
                yield f"{name}@jit", knobs, launch_through_triton
        if names is not None and name + UNCACHED in names:
            yield name + UNCACHED, knobs, without_call_cache


def profile_renders(
    pipe, call_kwargs, device, repeats: int, top: int, log, out: dict, save, variants, profiled: bool = True
) -> None:
    """Fills ``out`` per configuration and calls ``save()`` after each part: a run cut short keeps what ran.

    Timed renders are interleaved (one render of every configuration per round, ``repeats`` rounds) so a slow
    stretch of the host lands on all configurations alike; the per-configuration median is reported, with
    each configuration's ratio to ``dense`` per round (median) where ``dense`` ran. ``profiled=False`` skips
    the profiled renders."""
    import dit_accel
    from dit_accel.pipelines.quality import render_frames

    @contextlib.contextmanager
    def applied(knobs, context):
        handle = dit_accel.apply(pipe.transformer, **knobs) if knobs else None
        try:
            with context():
                yield handle
        finally:
            if handle is not None:
                dit_accel.remove(pipe.transformer)

    def frames(knobs, context):
        with applied(knobs, context) as handle:
            clip = render_frames(pipe, "a red ball moves left", 0, **call_kwargs)
            return clip, (handle.stats().graphs if handle is not None else {})

    def render(knobs, context):
        with applied(knobs, context):
            _sync(device)
            t0 = time.perf_counter()
            render_frames(pipe, "a red ball moves left", 0, **call_kwargs)
            _sync(device)
            return time.perf_counter() - t0

    for name, knobs, context in variants:
        for _ in range(2):
            render(knobs, context)
        out[name] = {"knobs": knobs, "all_seconds": []}
    check_graphs(variants, out, lambda knobs, context: frames(knobs, context), log)
    check_blocks(variants, out, lambda knobs, context: frames(knobs, context), log)
    variants = [v for v in variants if out[v[0]].get("graphs_check", "passed") == "passed"]
    for r in range(repeats):
        for name, knobs, context in variants:
            out[name]["all_seconds"].append(render(knobs, context))
        log(
            f"round {r + 1}/{repeats}: "
            + ", ".join(f"{n} {out[n]['all_seconds'][-1]:.3f}" for n, *_ in variants)
        )
    for name, *_ in variants:
        out[name]["seconds"] = statistics.median(out[name]["all_seconds"])
        if "dense" in out:
            ratios = [d / s for d, s in zip(out["dense"]["all_seconds"], out[name]["all_seconds"])]
            out[name]["speedup_vs_dense"] = statistics.median(ratios)
            out[name]["rounds_faster_than_dense"] = sum(r >= 1.0 for r in ratios)
    save()
    for name, *_ in variants:
        row = out[name]
        log(
            f"{name}: {row['seconds']:.3f} s per clip (median of {repeats})"
            + (
                f", {row['speedup_vs_dense']:.3f}x dense (median per round; "
                f"{row['rounds_faster_than_dense']}/{repeats} rounds at least as fast)"
                if "speedup_vs_dense" in row
                else ""
            )
        )
    if not profiled:
        return
    for name, knobs, context in variants:
        row = out[name]
        with applied(knobs, context):
            if device.type == "cuda":
                profile_one(pipe, call_kwargs, device, top, row)
            row["python_top"] = python_profile(
                lambda: render_frames(pipe, "a red ball moves left", 0, **call_kwargs), top
            )
        save()
        if "kernel_launches" in row:
            log(
                f"{name}: {row['kernel_launches']} launches, syncs {row['host_syncs']}, "
                f"GPU busy {row['gpu_busy_s']:.3f} s"
            )


def check_graphs(variants, out: dict, frames, log) -> None:
    """Each ``<name>+graphs`` row against an eager render of ``<name>``: the largest frame difference and how
    its forwards ran. A row over ``GRAPH_TOLERANCE`` is marked failed and not timed."""
    for name, knobs, context in variants:
        if not knobs or not knobs.get("cuda_graphs"):
            continue
        eager, _ = frames({k: v for k, v in knobs.items() if k != "cuda_graphs"}, context)
        graphed, counts = frames(knobs, context)
        diff = float(abs(eager.astype("float64") - graphed.astype("float64")).max())
        ok = diff <= GRAPH_TOLERANCE and counts.get("replayed", 0) > 0
        out[name].update(graphs_max_abs_diff=diff, graphs=counts, graphs_check="passed" if ok else "failed")
        log(f"{name}: max |frames - eager frames| {diff:.2e}; forwards {counts}" + ("" if ok else " FAILED"))


def check_blocks(variants, out: dict, frames, log) -> None:
    """Each row with ``fuse_blocks`` against a render without it: the largest frame difference and the PSNR
    (frames in [0, 1]). Recorded, not judged: this is the fused blocks' effect on a clip."""
    for name, knobs, context in variants:
        if not knobs or not knobs.get("fuse_blocks"):
            continue
        unfused, _ = frames({k: v for k, v in knobs.items() if k != "fuse_blocks"}, context)
        fused, _ = frames(knobs, context)
        err = fused.astype("float64") - unfused.astype("float64")
        mse = float((err**2).mean())
        psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
        out[name].update(blocks_max_abs_diff=float(abs(err).max()), blocks_psnr_db=psnr)
        log(f"{name}: max |frames - unfused frames| {abs(err).max():.2e}, PSNR {psnr:.1f} dB")


def profile_one(pipe, call_kwargs, device, top: int, row: dict) -> None:
    """One render under torch.profiler: launches, host syncs, GPU busy time, the host's busiest ops."""
    from torch.profiler import ProfilerActivity, profile

    from dit_accel.pipelines.quality import render_frames

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _sync(device)
        t0 = time.perf_counter()
        render_frames(pipe, "a red ball moves left", 0, **call_kwargs)
        _sync(device)
        row["profiled_wall_s"] = time.perf_counter() - t0
    events = prof.key_averages()
    counts = Counter({e.key: e.count for e in events})
    row["host_syncs"] = {k: counts[k] for k in SYNC_OPS if counts[k]}
    row["kernel_launches"] = sum(counts[k] for k in LAUNCH_OPS)
    row["gpu_busy_s"] = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
    busiest = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    row["host_top"] = [
        {"op": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in busiest
    ]


def python_profile(fn, top: int) -> list[dict]:
    """One call of ``fn`` under cProfile: the ``top`` Python functions by own time (ms) with their calls
    and cumulative time, so host time can be pinned on a function rather than an aten op."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [
        {
            "function": f"{Path(file).name}:{line}({name})",
            "calls": calls,
            "own_ms": own * 1e3,
            "cumulative_ms": cum * 1e3,
        }
        for (file, line, name), (_, calls, own, cum, _) in rows
    ]


def one_call(device, dtype, heads: int, seq: int, d: int, log) -> dict:
    import torch.nn.functional as F

    from dit_accel.kernels import BlockPlan, block_sparse_attention, dense_attention

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, seq, heads, d, device=device, dtype=dtype, generator=g) for _ in range(3))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    block = 128 if device.type == "cuda" else 16
    nb = -(-seq // block)
    paths = {"sdpa": lambda: F.scaled_dot_product_attention(qh, kh, vh)}
    contexts = {}
    if device.type == "cuda":
        paths["dense_triton"] = lambda: dense_attention(q, k, v, backend="triton", return_lse=False)
    plans = {}
    for density in (1.0, 0.5, 0.25):
        keep = max(1, round(density * nb))
        idx = torch.arange(nb, device=device)
        mask = ((idx[None, :] - idx[:, None]) % nb < keep)[None, None].expand(1, heads, nb, nb)
        plans[density] = plan = BlockPlan.from_block_mask(mask, block, block)
        paths[f"sparse_{density}"] = lambda plan=plan: block_sparse_attention(q, k, v, plan)
    if device.type == "cuda":
        from dit_accel.kernels.triton_attention import sparse_attention_fwd

        # Layers of one sparse call at density 0.5: the launcher alone; both also on the old path.
        plan = plans[0.5]
        paths["sparse_0.5_launcher_only"] = lambda: sparse_attention_fwd(
            qh, kh, vh, plan.kv_indices, plan.kv_counts, block, block, d**-0.5, None
        )
        paths["sparse_0.5_launcher_only@jit"] = paths["sparse_0.5_launcher_only"]
        paths["sparse_0.5@jit"] = paths["sparse_0.5"]
        contexts["sparse_0.5_launcher_only@jit"] = contexts["sparse_0.5@jit"] = launch_through_triton
        paths["sparse_0.5" + UNCACHED] = paths["sparse_0.5"]
        contexts["sparse_0.5" + UNCACHED] = without_call_cache
    res = {"shape": [1, heads, seq, d]}
    n, rounds = (100, 7) if device.type == "cuda" else (3, 1)
    host = {name: [] for name in paths}
    total = {name: [] for name in paths}
    for _ in range(rounds):  # interleaved: a slow stretch of the host hits every path alike
        for name, fn in paths.items():
            with contexts.get(name, contextlib.nullcontext)():
                for _ in range(3):
                    fn()
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                host[name].append((time.perf_counter() - t0) / n)
                _sync(device)
                total[name].append((time.perf_counter() - t0) / n)
    for name in paths:
        h, t = statistics.median(host[name]), statistics.median(total[name])
        res[name] = {"host_ms_per_call": h * 1e3, "ms_per_call": t * 1e3, "rounds": rounds}
        log(f"  {name:28s} host {h * 1e3:7.3f} ms  per call {t * 1e3:7.3f} ms  (median of {rounds} x {n})")
    if device.type == "cuda":
        # Where the launcher's host time goes (Python functions; C calls appear as builtins).
        fn = paths["sparse_0.5_launcher_only"]
        res["launcher_python_top"] = python_profile(lambda: [fn() for _ in range(n)], 15)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, the CPU geometry, 2 steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top", type=int, default=20, help="host ops listed per configuration")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one-call-only", action="store_true", help="part 2 only (seconds)")
    ap.add_argument("--renders-only", action="store_true", help="part 1 only")
    ap.add_argument("--no-profile", action="store_true", help="timed renders only, no profiled ones")
    ap.add_argument("--no-jit", action="store_true", help="no <name>@jit rows")
    ap.add_argument("--configs", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    args = ap.parse_args(argv)
    from dit_accel.pipelines.tiny_video.model import load_tiny_video_pipeline, render_defaults

    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA device (use --smoke on CPU)")
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    pipe = load_tiny_video_pipeline(device=device)
    pipe.set_progress_bar_config(disable=True)
    geo = render_defaults(device)
    call_kwargs = {
        "num_frames": geo["frames"],
        "height": geo["height"],
        "width": geo["width"],
        "num_inference_steps": 2 if args.smoke else geo["steps"],
    }
    report = {
        "benchmark": "profile_embedded",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": versions(),
        "call_kwargs": call_kwargs,
    }
    out = args.out or Path(__file__).parent / "results" / (
        f"profile_embedded_{'smoke' if args.smoke else gpu_tag()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(report, indent=1) + "\n")

    cfg = pipe.transformer.config
    tokens = ((geo["frames"] - 1) // 4 + 1) * (geo["height"] // 16) * (geo["width"] // 16)  # VAE 4x, patch 4
    if not args.renders_only:
        log("one attention call at the model's shape:")
        report["one_call"] = one_call(
            device,
            torch.bfloat16 if device.type == "cuda" else torch.float32,
            cfg.num_attention_heads,
            tokens,
            cfg.attention_head_dim,
            log,
        )
        save()
        if args.one_call_only:
            return report
    names = None
    if args.configs:
        names = args.configs.split(",")
        unknown = sorted({n.removesuffix(UNCACHED) for n in names} - set(CONFIGS))
        if unknown:
            ap.error(
                f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)} (each also as <name>{UNCACHED})"
            )
    report["renders"] = {}
    profile_renders(
        pipe,
        call_kwargs,
        device,
        1 if args.smoke else args.repeats,
        args.top,
        log,
        report["renders"],
        save,
        list(_variants(names, jit=not args.no_jit)),
        profiled=not args.no_profile,
    )
    log(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
