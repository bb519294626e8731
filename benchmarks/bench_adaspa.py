"""AdaSpa on GPU: search costs against one dense attention, transformer-forward speedup, a 50-step run.

(a) Kernels at wan1.3b_480p_81f (1, 12, 32760, 128) and wan14b_720p_81f (1, 40, 75600, 128), random bf16
    q, k, v in SDPA's layout: one cuDNN dense attention (the baseline), ``dense_attention`` with LSE,
    ``block_mass`` alone, the fused search (dense with LSE + block mass + selection), the cached search
    (block mass of new q, k under the stale LSE + selection), the selection alone and the sparse attention
    at the selected plan, at sparsity 0.8 and 0.9 (head-adaptive tiers on, as the method's default).
    Random q, k give diffuse attention, so the selected blocks are arbitrary: fine for cost, meaningless
    for quality. Checks: rows of the fresh-LSE block mass sum to their row counts; the sparse output
    on two heads matches the fp32 torch reference on the same plan.
(b) One Wan2.1-1.3B transformer forward from its real config with random weights (bf16, latent
    (1, 16, 21, 60, 104), text (1, 512, 4096); as benchmarks/bench_forward.py), stock vs adaspa, per phase.
    The step tracker is driven as WanPipeline drives it: every forward runs inside
    ``transformer.cache_context("cond", step_index=i, num_inference_steps=50)``. With the default
    schedule (warm-up 0.2, search at 0.6) step 0 is dense, step 10 a fused search, 11 sparse on its plan,
    30 a cached search, 31 sparse on the new plan. Repeating a step index repeats that step's phase (a
    fused search re-searches, the cached search re-reads the kept LSE), so each is timed by calling the
    forward at its step index over and over. Check: the fused-search step (dense output) matches stock.
(c) A 50-step run composed from (b): 10 dense + fused + 19 sparse + cached + 19 sparse. Search share =
    ((fused - dense step) + (cached - sparse step)) / run time (target < 5%); speedup = 50 x stock / run.

Times are ``triton.testing.do_bench`` medians. A part whose check fails reports no speedup.

    python benchmarks/bench_adaspa.py [--out benchmarks/results/adaspa_<gpu>.json]
    python benchmarks/bench_adaspa.py --smoke      # tiny shapes on CPU, fp32, torch reference kernels
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench, gpu_tag, rel_err, versions  # noqa: E402
from bench_forward import WAN_1_3B, WAN_TINY  # noqa: E402

import dit_accel  # noqa: E402
from dit_accel.kernels import block_mass, block_sparse_attention, dense_attention  # noqa: E402
from dit_accel.kernels.plan import BlockPlan  # noqa: E402
from dit_accel.kernels.reference import attention_reference  # noqa: E402
from dit_accel.methods.adaspa import AdaspaSchedule, cached_search, fused_search  # noqa: E402

KERNEL_SHAPES = {
    # name: (B, H, S, D, block)
    "wan1.3b_480p_81f": (1, 12, 32760, 128, 128),
    "wan14b_720p_81f": (1, 40, 75600, 128, 128),
}
SMOKE_KERNEL_SHAPES = {"smoke_a": (1, 2, 200, 32, 16), "smoke_b": (1, 3, 333, 32, 16)}
FORWARD = {"latent": (1, 16, 21, 60, 104), "text": (1, 512, 4096), "block": 128}
SMOKE_FORWARD = {"latent": (1, 16, 3, 8, 12), "text": (1, 8, 32), "block": 16}
SPARSITIES = (0.8, 0.9)
NUM_STEPS = 50


class Timer:
    def __init__(self, smoke: bool, rep_ms: int):
        self.smoke, self.rep_ms = smoke, rep_ms

    def __call__(self, fn) -> float:
        return bench(fn, self.smoke, self.rep_ms)


def _heads(plan: BlockPlan, h: slice) -> BlockPlan:
    return BlockPlan(
        plan.block_q, plan.block_k, plan.kv_indices[:, h], plan.kv_counts[:, h], plan.num_kv_blocks
    )


# --------------------------------------------------------------------------------------------------
# (a) kernels
# --------------------------------------------------------------------------------------------------
def bench_kernels(name, shape, device, dtype, timer, backend, smoke) -> dict:
    B, H, S, D, block = shape
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    # The "current" q, k of a later step: the same tensors moved a little.
    q2 = q + 0.3 * torch.randn(q.shape, device=device, dtype=dtype, generator=g)
    k2 = k + 0.3 * torch.randn(k.shape, device=device, dtype=dtype, generator=g)
    kw = {"layout": "bhsd", "backend": backend}
    row = {"shape": [B, H, S, D], "block": block}

    def sdpa():
        if smoke:
            return F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    ms_dense = timer(sdpa)
    row["dense_sdpa_ms"] = ms_dense
    row["dense_sdpa_backend"] = "math (CPU)" if smoke else "cudnn"
    row["dense_attention_lse_ms"] = timer(lambda: dense_attention(q, k, v, **kw))
    _, lse = dense_attention(q, k, v, **kw)
    W = block_mass(q, k, lse, block, block, **kw)
    counts = torch.full((W.shape[2],), float(block), device=device)
    counts[-1] = S - block * (W.shape[2] - 1)
    mass_err = float(((W.sum(-1) - counts) / counts).abs().max())
    row["block_mass_ms"] = timer(lambda: block_mass(q, k, lse, block, block, **kw))
    row["block_mass_row_sum_max_rel_err"] = mass_err
    ok = mass_err <= 1e-2
    for s in SPARSITIES:
        sel = {"sparsity": s, "head_adaptive": True, "block_q": block, "block_k": block, **kw}
        _, _, plan, info = fused_search(q, k, v, **sel)
        plan2, _ = cached_search(q2, k2, lse, **sel)
        hs = slice(0, min(2, H))
        out = block_sparse_attention(q2, k2, v, plan2, **kw)[0][:, hs]
        ref = attention_reference(
            q2[:, hs].float(), k2[:, hs].float(), v[:, hs].float(), _heads(plan2, hs), D**-0.5
        )[0]
        err = rel_err(out, ref)
        sparse_ok = err <= (1e-4 if smoke else 2e-2)
        ok = ok and sparse_ok
        ms_fused = timer(lambda: fused_search(q, k, v, **sel))
        ms_cached = timer(lambda: cached_search(q2, k2, lse, **sel))
        ms_sparse = timer(lambda: block_sparse_attention(q2, k2, v, plan2, **kw))
        row[f"s{s}"] = {
            "density_fused_plan": info.density,
            "density_cached_plan": plan2.density(),
            "fused_search_ms": ms_fused,
            "cached_search_ms": ms_cached,
            "selection_ms": ms_cached - row["block_mass_ms"],
            "sparse_ms": ms_sparse,
            "sparse_rel_err_2_heads": err,
            "fused_over_dense": ms_fused / ms_dense,
            "cached_over_dense": ms_cached / ms_dense,
            "sparse_over_dense": ms_sparse / ms_dense if sparse_ok else None,
        }
    row["correct"] = ok
    return row


# --------------------------------------------------------------------------------------------------
# (b) + (c) transformer forward and the composed run
# --------------------------------------------------------------------------------------------------
def bench_forward(device, dtype, timer, backend, smoke) -> dict:
    from diffusers import WanTransformer3DModel

    shape = SMOKE_FORWARD if smoke else FORWARD
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**(WAN_TINY if smoke else WAN_1_3B))
    model = model.to(dtype=dtype).eval()
    latent = torch.randn(shape["latent"], device=device, dtype=dtype)
    text = torch.randn(shape["text"], device=device, dtype=dtype)
    timestep = torch.tensor([500.0], device=device)
    block = shape["block"]

    @torch.inference_mode()
    def forward():
        return model(hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False)[
            0
        ]

    def at_step(i):
        def fn():
            with model.cache_context("cond", step_index=i, num_inference_steps=NUM_STEPS):
                return forward()

        return fn

    schedule = AdaspaSchedule(NUM_STEPS)
    fused_step, (cached_step,) = schedule.fused_step, schedule.cached_steps
    phases = schedule.phases()
    result = {
        "latent": list(shape["latent"]),
        "text": list(shape["text"]),
        "block": block,
        "num_steps": NUM_STEPS,
        "schedule": {p: phases.count(p) for p in ("dense", "fused_search", "cached_search", "sparse")},
        "steps_timed": {"dense": 0, "fused_search": fused_step, "sparse_1": fused_step + 1},
    }
    result["steps_timed"].update({"cached_search": cached_step, "sparse_2": cached_step + 1})
    stock = forward()
    ms_stock = timer(forward)
    result["stock_ms"] = ms_stock
    per_sparsity = {}
    for s in SPARSITIES:
        handle = dit_accel.apply(
            model, method="adaspa", sparsity=s, block_q=block, block_k=block, backend=backend
        )
        ms = {"dense": timer(at_step(0))}
        fused_out = at_step(fused_step)()
        err = rel_err(fused_out, stock)
        ok = err <= (1e-5 if smoke else 3e-2)
        ms["fused_search"] = timer(at_step(fused_step))
        ms["sparse_1"] = timer(at_step(fused_step + 1))
        ms["cached_search"] = timer(at_step(cached_step))
        ms["sparse_2"] = timer(at_step(cached_step + 1))
        records = handle.stats().records
        kinds = {r["step"]: r["kind"] for r in records}
        expected = {0: "dense", fused_step: "fused_search", fused_step + 1: "sparse"}
        expected.update({cached_step: "cached_search", cached_step + 1: "sparse"})
        ok = ok and kinds == expected and torch.isfinite(at_step(cached_step + 1)()).all().item()
        density = {
            p: statistics.mean(r["density"] for r in records if r["step"] == st)
            for p, st in (("sparse_1", fused_step + 1), ("sparse_2", cached_step + 1))
        }
        n_sparse_1 = phases[:cached_step].count("sparse")  # on the fused-search plan
        run_ms = (
            phases.count("dense") * ms["dense"]
            + ms["fused_search"]
            + n_sparse_1 * ms["sparse_1"]
            + ms["cached_search"]
            + (phases.count("sparse") - n_sparse_1) * ms["sparse_2"]
        )
        search_ms = (ms["fused_search"] - ms["dense"]) + (ms["cached_search"] - ms["sparse_2"])
        memory = handle.stats().memory
        per_sparsity[f"s{s}"] = {
            "correct": bool(ok),
            "fused_step_rel_err_vs_stock": err,
            "phases_seen": {str(k): v for k, v in sorted(kinds.items())},
            "ms": ms,
            "density": density,
            "cache_bytes_peak": memory.get("peak"),
            "sparse_step_speedup": ms_stock / ms["sparse_1"] if ok else None,
            "run_ms": run_ms,
            "stock_run_ms": NUM_STEPS * ms_stock,
            "search_ms": search_ms,
            "search_share": search_ms / run_ms,
            "composed_speedup": NUM_STEPS * ms_stock / run_ms if ok else None,
        }
        dit_accel.remove(model)
    result["per_sparsity"] = per_sparsity
    return result


def _table(result: dict) -> str:
    lines = ["(a) kernels, ms (ratio to one dense SDPA)"]
    lines.append(f"{'shape':<20}{'s':>5}{'dense':>9}{'fused':>16}{'cached':>16}{'sparse':>16}{'density':>9}")
    for name, row in result["kernels"].items():
        d = row["dense_sdpa_ms"]
        for s in SPARSITIES:
            r = row[f"s{s}"]
            cells = [
                f"{r[x]:8.2f} ({r[x] / d:4.2f})" for x in ("fused_search_ms", "cached_search_ms", "sparse_ms")
            ]
            lines.append(
                f"{name:<20}{s:>5}{d:>9.2f}"
                + "".join(f"{c:>16}" for c in cells)
                + f"{r['density_cached_plan']:>9.3f}"
            )
    f = result["forward"]
    lines.append(f"(b, c) Wan2.1-1.3B forward: stock {f['stock_ms']:.1f} ms")
    lines.append(
        f"{'s':>5}{'dense':>9}{'fused':>9}{'sparse':>9}{'cached':>9}{'step x':>8}{'search %':>10}{'run x':>8}"
    )
    for key, r in f["per_sparsity"].items():
        ms = r["ms"]
        step_x = f"{r['sparse_step_speedup']:.2f}" if r["sparse_step_speedup"] else "-"
        run_x = f"{r['composed_speedup']:.2f}" if r["composed_speedup"] else "-"
        lines.append(
            f"{key[1:]:>5}{ms['dense']:>9.1f}{ms['fused_search']:>9.1f}{ms['sparse_1']:>9.1f}"
            f"{ms['cached_search']:>9.1f}{step_x:>8}{100 * r['search_share']:>9.2f}%{run_x:>8}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the code paths)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--rep-ms", type=int, default=500, help="do_bench rep budget per measurement")
    parser.add_argument("--skip-forward", action="store_true", help="only part (a)")
    args = parser.parse_args(argv)

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA device (use --smoke on CPU)")
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    timer = Timer(smoke, args.rep_ms)
    default_out = (
        Path(tempfile.gettempdir()) / "adaspa_smoke.json"
        if smoke
        else Path(__file__).parent / "results" / f"adaspa_{gpu_tag()}.json"
    )
    out_path = args.out or default_out

    result = {
        "benchmark": "bench_adaspa",
        "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": versions(),
        "timer": "perf_counter median of 3"
        if smoke
        else f"triton.testing.do_bench median, rep {args.rep_ms} ms",
        "backend": args.backend,
        "sparsities": list(SPARSITIES),
        "head_adaptive": True,
    }
    shapes = SMOKE_KERNEL_SHAPES if smoke else KERNEL_SHAPES
    result["kernels"] = {
        name: bench_kernels(name, shape, device, dtype, timer, args.backend, smoke)
        for name, shape in shapes.items()
    }
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_forward:
        result["forward"] = bench_forward(device, dtype, timer, args.backend, smoke)
    result["correct"] = all(r["correct"] for r in result["kernels"].values()) and all(
        r["correct"] for r in result.get("forward", {}).get("per_sparsity", {}).values()
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    if "forward" in result:
        print(_table(result))
    print(f"wrote {out_path}")
    if not result["correct"]:
        print("a correctness check failed: speedups of the failing parts are not reported", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
