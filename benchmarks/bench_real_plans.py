"""The sparse kernel on a real run's plans, beside synthetic plans with the same row counts, in one process.

The whole-run benchmark's attention timings per computed block (CUDA events around each call in a model
forward) can run below the synthetic A/B's rate (``triton.testing.do_bench`` on uniform random plans) at the
same density. This script separates what differs between the two:

- the plan: the run's own rows against uniform random rows of the same counts (``synthetic``);
- the values: the run's q, k, v against random ones (``real_randn``; lazy rescaling branches on the scores);
- the tile: the autotuner picks it at a key's first launch in the run; every candidate tile is timed on the
  first captured call;
- the timer: one CUDA-event-timed call, as the run times it (no L2 flush), against do_bench medians.

For a ``bench_e2e`` geometry and a preset: the transformer with random weights, dit_accel applied with
``timing=True``, the cond forward at the schedule's search step (if any) and twice at its first sparse step,
capturing the q, k, v and plan of the first ``--layers`` sparse calls of the last forward. Each captured call
is then timed against cuDNN on the same q, k, v, in interleaved do_bench rounds. Plan structure is recorded
too: counts per row and their spread across heads, the share of rows holding the partial last key block, and
the mean run of consecutive key blocks.

    source benchmarks/gpu_env.sh && python3 benchmarks/bench_real_plans.py --geometry wan14b_720p_81f \\
        --preset adaspa:sparsity=0.9 --out PATH.json                      # about 1 min (H200)

``--smoke``: the same code on the CPU (tiny Wan, the model on the torch backend, the captured calls through
Triton's interpreter in float16, perf_counter timings): ``tests/test_bench_real_plans.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e  # noqa: E402
from _common import bench, interleaved_ms, rel_err, versions, write_json  # noqa: E402
from bench_kernels import tflops  # noqa: E402

import dit_accel.methods.base as methods_base  # noqa: E402
from dit_accel.kernels import BlockPlan, block_sparse_attention  # noqa: E402
from dit_accel.pipelines.bench import parse_config  # noqa: E402


def capture_sparse_calls(limit: int):
    """Context manager patching the methods' sparse-kernel entry point; yields the list it fills with the
    first ``limit`` calls' (q, k, v, plan, kwargs) while ``armed[0]`` is True (copies: the model reuses
    its buffers)."""
    captured: list[dict] = []
    armed = [False]
    original = methods_base.block_sparse_attention

    def spy(q, k, v, plan, **kwargs):
        if armed[0] and len(captured) < limit and kwargs.get("correction") is None:
            captured.append(
                {
                    "q": q.detach().clone(),
                    "k": k.detach().clone(),
                    "v": v.detach().clone(),
                    "plan": plan,
                    "layout": kwargs.get("layout", "bshd"),
                    "kv_len": kwargs.get("kv_len"),
                }
            )
        return original(q, k, v, plan, **kwargs)

    return mock.patch.object(methods_base, "block_sparse_attention", spy), captured, armed


def synthetic_like(plan: BlockPlan, seed: int = 0) -> BlockPlan:
    """Uniform random key blocks with ``plan``'s count in every row."""
    counts = plan.kv_counts.long()
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (*counts.shape, plan.num_kv_blocks)
    scores = torch.rand(shape, generator=g).to(counts.device)
    rank = scores.argsort(dim=-1).argsort(dim=-1)  # each block's place in its row's random order
    mask = rank < counts.unsqueeze(-1)
    return BlockPlan.from_block_mask(mask, plan.block_q, plan.block_k)


def plan_structure(plan: BlockPlan) -> dict:
    """Row counts (min / mean / max, per-head mean spread), rows holding the last key block, mean run of
    consecutive key blocks."""
    counts = plan.kv_counts.double()
    idx = plan.kv_indices.long()
    max_k = idx.shape[-1]
    valid = torch.arange(max_k, device=idx.device) < plan.kv_counts.unsqueeze(-1)
    last = plan.num_kv_blocks - 1
    holds_last = ((idx == last) & valid).any(-1).double().mean()
    breaks = ((idx[..., 1:] != idx[..., :-1] + 1) & valid[..., 1:]).sum()
    runs = breaks + (plan.kv_counts > 0).sum()
    per_head = counts.mean(dim=(0, 2)) if counts.dim() == 3 else counts.mean()
    return {
        "density": plan.density(),
        "count_min": int(counts.min()),
        "count_mean": float(counts.mean()),
        "count_max": int(counts.max()),
        "head_mean_count_min": float(per_head.min()),
        "head_mean_count_max": float(per_head.max()),
        "rows_holding_last_block": float(holds_last),
        "mean_run_blocks": float(counts.sum() / runs.clamp(min=1)),
    }


def _sparse_key():
    """The autotuner key of the attention kernel's latest tuning without a correction (None if none)."""
    from dit_accel.kernels import triton_attention, triton_common

    kernel = triton_attention._block_sparse_attn_fwd_kernel
    keys = [
        k for k in triton_common._TUNED if k[0] is kernel and not dict(zip(kernel.keys, k[1:]))["HAS_CORR"]
    ]
    return keys[-1] if keys else None


def time_call(call: dict, cudnn_fn, args, smoke: bool) -> dict:
    """Every variant of one captured call, against cuDNN on the same q, k, v."""
    from dit_accel.kernels import triton_common

    q, k, v, plan, layout = call["q"], call["k"], call["v"], call["plan"], call["layout"]
    if smoke:  # the interpreter's kernels take half precision
        q, k, v = (x.half() for x in (q, k, v))
    kv_len = call["kv_len"]
    synth = synthetic_like(plan)
    g = torch.Generator(device=q.device).manual_seed(3)
    qr, kr, vr = (torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) for x in (q, k, v))

    def run(plan_, q_=q, k_=k, v_=v):
        return lambda: block_sparse_attention(
            q_, k_, v_, plan_, kv_len=kv_len, layout=layout, backend="triton"
        )

    fns = {
        "real": run(plan),
        "real_randn": run(plan, qr, kr, vr),
        "synthetic": run(synth),
        "cudnn": lambda: cudnn_fn(q, k, v, layout),
    }
    err = _check_first_head(q, k, v, plan, kv_len, layout, fns["real"]()[0])
    if smoke:
        ms = {name: bench(fn, smoke=True) for name, fn in fns.items()}
    else:
        ms = interleaved_ms(fns, rep_ms=args.rep_ms, rounds=args.rounds)
    if layout == "bshd":
        batch, seq, heads, d = q.shape
    else:
        batch, heads, seq, d = q.shape
    dense_pairs = seq * seq * heads
    row = {"err_vs_torch": err, "structure": plan_structure(plan), "synthetic_density": synth.density()}
    cudnn_tf = tflops(dense_pairs, batch, d, ms["cudnn"])
    for name, t in ms.items():
        density = 1.0 if name == "cudnn" else (synth.density() if name == "synthetic" else plan.density())
        tf = tflops(dense_pairs * density, batch, d, t)
        row[name] = {"ms": t, "tflops": tf, "vs_cudnn": tf / cudnn_tf}
    row["events_ms"] = _event_ms(fns["real"], smoke)
    key = _sparse_key()
    if key is not None:
        row["tuned"] = str(triton_common._TUNED[key][0])
    return row


def _check_first_head(q, k, v, plan, kv_len, layout, out) -> float:
    """Relative error of the kernel's output against the fp32 torch path, on the first head (the torch
    path is slow at real shapes)."""
    head = 2 if layout == "bshd" else 1
    q1, k1, v1, o1 = (x.narrow(head, 0, 1).float() for x in (q, k, v, out))
    p1 = (
        plan
        if plan.heads == 1
        else BlockPlan.from_block_mask(plan.to_block_mask()[:, :1], plan.block_q, plan.block_k)
    )
    ref = block_sparse_attention(q1, k1, v1, p1, kv_len=kv_len, layout=layout, backend="torch")[0]
    return rel_err(o1, ref)


def _event_ms(fn, smoke: bool, calls: int = 5) -> float:
    """Median of single calls timed as the whole-run benchmark times them (events; no L2 flush)."""
    times = []
    for _ in range(calls):
        if smoke:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_tiles(call: dict, args, smoke: bool) -> dict:
    """The first captured call's real plan under every candidate tile of the attention kernel."""
    from dit_accel.kernels import triton_common

    key = _sparse_key()
    if key is None:
        return {}
    plan = call["plan"]
    kwargs = {
        "PLAN_BQ": plan.block_q,
        "PLAN_BK": plan.block_k,
        "HEAD_DIM_PAD": triton_common.head_dim_pad(call["q"].shape[-1]),
    }
    tiles = triton_common.prune_configs(triton_common.attention_configs(), None, **kwargs)
    q, k, v = (x.half() if smoke else x for x in (call["q"], call["k"], call["v"]))
    saved = triton_common._TUNED[key]
    out = {}
    try:

        def fn():
            return block_sparse_attention(
                q, k, v, plan, kv_len=call["kv_len"], layout=call["layout"], backend="triton"
            )

        for cfg in tiles:
            triton_common._TUNED[key] = (cfg, cfg.all_kwargs())
            try:
                out[str(cfg)] = bench(fn, smoke=smoke, rep_ms=args.rep_ms)
            except Exception as e:  # noqa: BLE001 - the autotuner skips a tile that does not fit; so do we
                out[str(cfg)] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        triton_common._TUNED[key] = saved
    return out


def _cudnn(q, k, v, layout):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v)) if layout == "bshd" else (q, k, v)
    backends = [SDPBackend.CUDNN_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="wan14b_720p_81f", help="a bench_e2e geometry")
    parser.add_argument(
        "--preset",
        default="adaspa:sparsity=0.9",
        help="a preset of the geometry's family or a method spec (method:key=value,...) with plain sparse "
        "steps: quality, or adaspa (the fast preset's method until 2026-12-05); balanced and fast are "
        "re-ttention on Wan and HunyuanVideo, whose corrected steps this does not capture",
    )
    parser.add_argument("--layers", type=int, default=2, help="sparse calls captured and timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="tiny Wan on the CPU (see the module docstring)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else args.geometry
    if name not in bench_e2e.GEOMETRIES:
        parser.error(f"--geometry: unknown {name!r}; known: {', '.join(bench_e2e.GEOMETRIES)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA device (use --smoke on the CPU)")
    geom = bench_e2e.GEOMETRIES[name]
    family = geom["family"]
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    steps = 8 if args.smoke else 50
    preset, spec_knobs = parse_config(args.preset)
    knobs = bench_e2e.row_knobs({"name": args.preset, "preset": preset, **spec_knobs}, family)
    schedule = bench_e2e.probe_schedule(family, knobs, steps, ("cond",))["cond"]
    if "sparse" not in schedule:
        parser.error(f"--preset {args.preset}: its schedule at {steps} steps has no sparse step: {schedule}")
    sparse_step = schedule.index("sparse")
    search = [s for s in range(sparse_step) if "search" in schedule[s]]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    model = bench_e2e.build_model(family, geom["config"], device, dtype)
    inputs = bench_e2e.make_inputs(geom["family"], geom, ("cond",), device, dtype)
    handle = bench_e2e.install(
        model, knobs, block=geom["block"], backend="torch" if args.smoke else "auto", timing=True
    )
    patch, captured, armed = capture_sparse_calls(args.layers)
    with patch:
        for step in search[-1:]:
            bench_e2e.forward_call(model, inputs, "cond", step, steps, device)
        bench_e2e.forward_call(model, inputs, "cond", sparse_step, steps, device)  # first launch: tunes
        armed[0] = True
        bench_e2e.forward_call(model, inputs, "cond", sparse_step, steps, device)
    records = [r for r in handle.stats().records if r["step"] == sparse_step]
    in_run = records[len(records) // 2 :]  # the second forward's calls
    layers = [r for r in in_run if r["kind"] == "sparse"][: len(captured)]
    log(f"[{name}] {args.preset}: steps {search[-1:]} + {sparse_step}, captured {len(captured)} calls")
    bench_e2e.uninstall(model)
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()

    rows = []
    for i, call in enumerate(captured):
        row = time_call(call, _cudnn, args, args.smoke)
        if i < len(layers):
            row["layer"] = layers[i]["layer"]
            row["in_run_ms"] = layers[i]["time_ms"]
        rows.append(row)
        log(
            f"  call {i}: density {row['structure']['density']:.3f}, "
            f"real {row['real']['vs_cudnn']:.3f}x cuDNN, real_randn {row['real_randn']['vs_cudnn']:.3f}x, "
            f"synthetic {row['synthetic']['vs_cudnn']:.3f}x; "
            f"in-run {row.get('in_run_ms') or float('nan'):.2f} ms, events {row['events_ms']:.2f} ms, "
            f"do_bench {row['real']['ms']:.2f} ms; tile {row.get('tuned')}"
        )
    tiles = time_tiles(captured[0], args, args.smoke) if captured else {}
    for cfg, ms in tiles.items():
        log(f"  tile {cfg}: {ms:.2f} ms" if isinstance(ms, float) else f"  tile {cfg}: {ms}")
    result = {
        "benchmark": "bench_real_plans",
        "geometry": name,
        "preset": args.preset,
        "schedule": schedule,
        "sparse_step": sparse_step,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": versions(),
        "calls": rows,
        "tiles_ms": tiles,
        "elapsed_s": time.perf_counter() - t0,
    }
    write_json(args.out, result)
    log(f"[{name}] wrote {args.out} ({result['elapsed_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
