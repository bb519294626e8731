"""Radial attention at Wan geometries: attention-only and transformer-forward speedups vs dense cuDNN, and
the composed 50-step estimate with the dense warm-up.

Per shape (``wan1.3b_480p_81f``: grid 21x30x52, 12 heads x 128, 30 layers; ``wan14b_720p_81f``: 21x45x80,
40 heads x 128, 40 layers), at Wan's radial defaults (``dit_accel.processors.wan.FAMILY.defaults``: decay 0.2,
sink frame, layer 0 dense, 128-token blocks):

(a) attention only, bf16, one call: our block-sparse kernel with the radial plan vs cuDNN SDPA (dense) and
    our dense Triton kernel; medians of ``triton.testing.do_bench``. The sparse output is checked against
    an fp32 oracle on sampled query blocks (exact attention over each block's planned keys); a kernel that
    fails gets no speedup reported.
(b) one WanTransformer3DModel forward from the real config with random weights (bf16): stock (cuDNN SDPA
    forced with ``sdpa_kernel``) vs ``dit_accel.apply(model, method="radial", dense_steps=0)``; 1 warm-up +
    3 timed forwards each (median). ``dense_steps=0`` makes every step sparse: a bare transformer call has
    no step count, so the default fractional warm-up (0.25) would run dense (logged); repeated calls with
    the same timestep are the same step 0 for the step tracker. Layer 0 stays dense (the Wan default).
    The output's cosine similarity and relative error vs the stock output are reported, not asserted
    (radial is an approximation); the stats must show the expected dense/sparse pattern.
(c) composed 50-step estimate: (n_dense * t_dense + (50 - n_dense) * t_sparse) / (50 * t_dense) with
    n_dense = 12 (the reference) and n_dense = int(0.25 * 50) (``dense_steps=0.25``, the default; also 12).
    A dense warm-up step is a stock forward: the radial processors hand dense calls to the stock op.

GPU run (about 3-4 minutes on an H200; the 14B model takes ~28 GB in bf16, built in fp32 on the GPU first):

    python benchmarks/bench_radial.py [--shapes wan1.3b_480p_81f,wan14b_720p_81f] [--out PATH]

CPU smoke run of the same code paths on tiny shapes (fp32, torch reference kernels, perf_counter):

    python benchmarks/bench_radial.py --smoke --out /tmp/radial_smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import bench, gpu_tag, rel_err, versions
from bench_forward import WAN_1_3B, WAN_TINY
from diffusers import WanTransformer3DModel

import dit_accel
from dit_accel.kernels import block_sparse_attention, dense_attention
from dit_accel.methods.radial import build_plan
from dit_accel.processors.wan import FAMILY as WAN

WAN_14B = {
    **WAN_1_3B,
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "ffn_dim": 13824,
    "num_layers": 40,
}
SHAPES = {
    "wan1.3b_480p_81f": {"config": WAN_1_3B, "latent": (1, 16, 21, 60, 104), "text": (1, 512, 4096)},
    "wan14b_720p_81f": {"config": WAN_14B, "latent": (1, 16, 21, 90, 160), "text": (1, 512, 4096)},
    "smoke_a": {"config": WAN_TINY, "latent": (1, 16, 9, 8, 12), "text": (1, 8, 32)},
    "smoke_b": {"config": WAN_TINY, "latent": (1, 16, 9, 12, 16), "text": (1, 8, 32)},
}
STEPS = 50
REFERENCE_DENSE_STEPS = 12
ORACLE_BLOCKS = 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_forward(
    forward, device: torch.device, repeats: int = 3
) -> tuple[float, list[float], float, torch.Tensor]:
    """1 warm-up + ``repeats`` timed calls: median ms, the timed ms, the warm-up ms, the warm-up output."""
    _sync(device)
    t0 = time.perf_counter()
    out = forward()
    _sync(device)
    warmup = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times, warmup, out


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


def _oracle_error(q, k, v, out, plan, blocks: list[int]) -> float:
    """Max relative error of ``out`` ([B, H, S, D]) on query blocks ``blocks`` vs exact fp32 attention over
    each block's planned keys."""
    seq, scale = q.shape[2], q.shape[-1] ** -0.5
    worst = 0.0
    for p in blocks:
        rows = slice(p * plan.block_q, min((p + 1) * plan.block_q, seq))
        count = int(plan.kv_counts[0, 0, p])
        keys = torch.cat(
            [
                torch.arange(c * plan.block_k, min((c + 1) * plan.block_k, seq), device=q.device)
                for c in plan.kv_indices[0, 0, p, :count].tolist()
            ]
        )
        s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, rows].float(), k[:, :, keys].float()) * scale
        ref = torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v[:, :, keys].float())
        worst = max(worst, rel_err(out[:, :, rows], ref))
    return worst


def attention_only(name, shape, plan, device, dtype, smoke, backend, log) -> dict:
    """(a): one attention call, radial plan vs dense cuDNN SDPA and our dense kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _, _, frames, lat_h, lat_w = shape["latent"]
    cfg = shape["config"]
    heads, d = cfg["num_attention_heads"], cfg["attention_head_dim"]
    seq = frames * (lat_h // 2) * (lat_w // 2)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, d, device=device, dtype=dtype, generator=g) for _ in range(3))

    def sdpa():
        if smoke:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    ours_dense_backend = "torch" if smoke else "triton"
    sparse_backend = "torch" if smoke else backend

    ref = sdpa()
    out_dense, _ = dense_attention(q, k, v, layout="bhsd", backend=ours_dense_backend)
    out_sparse, _ = block_sparse_attention(q, k, v, plan, layout="bhsd", backend=sparse_backend)
    n = plan.num_q_blocks
    blocks = sorted(
        {0, n - 1, *torch.randperm(n, generator=torch.Generator().manual_seed(0))[:ORACLE_BLOCKS]}
    )
    sparse_err = _oracle_error(q, k, v, out_sparse, plan, [int(b) for b in blocks])
    dense_err = rel_err(out_dense, ref)
    tol = 1e-4 if smoke else 2e-2
    correct = sparse_err <= tol and dense_err <= tol and bool(torch.isfinite(out_sparse).all())

    ms_sdpa = bench(sdpa, smoke)
    ms_dense = bench(lambda: dense_attention(q, k, v, layout="bhsd", backend=ours_dense_backend), smoke)
    ms_sparse = bench(
        lambda: block_sparse_attention(q, k, v, plan, layout="bhsd", backend=sparse_backend), smoke
    )
    pairs = _computed_pairs(plan, seq)
    res = {
        "B": 1,
        "H": heads,
        "S": seq,
        "D": d,
        "sdpa_backend": "math/default (CPU smoke)" if smoke else "cudnn",
        "ms": {"sdpa_dense": ms_sdpa, "ours_dense": ms_dense, "radial_sparse": ms_sparse},
        "tflops": {
            "sdpa_dense": _tflops(seq * seq * heads, d, ms_sdpa),
            "ours_dense": _tflops(seq * seq * heads, d, ms_dense),
            "radial_sparse_effective": _tflops(pairs * heads, d, ms_sparse),
        },
        "checks": {
            "sparse_vs_oracle_max_rel_err": sparse_err,
            "oracle_query_blocks": [int(b) for b in blocks],
            "ours_dense_vs_sdpa_rel_err": dense_err,
            "tolerance": tol,
        },
        "correct": correct,
        "speedup_vs_sdpa_dense": ms_sdpa / ms_sparse if correct else None,
        "speedup_vs_ours_dense": ms_dense / ms_sparse if correct else None,
    }
    log(
        f"{name}: attention S={seq} H={heads}: sdpa {ms_sdpa:.2f} ms, ours dense {ms_dense:.2f} ms, "
        f"radial {ms_sparse:.2f} ms (err {sparse_err:.1e}{'' if correct else ' FAILED CHECK'})"
    )
    return res


def _computed_pairs(plan, seq: int) -> int:
    """(query, key) pairs inside the plan's computed blocks (heads of 1), tails counted exactly."""
    n = plan.num_kv_blocks
    sizes = torch.full((n,), plan.block_k, dtype=torch.float64)
    sizes[-1] = seq - plan.block_k * (n - 1)
    mask = plan.to_block_mask()[0, 0].cpu().double()
    return int(torch.einsum("pq,p,q->", mask, sizes, sizes).item())


def _tflops(pairs: int, d: int, ms: float) -> float:
    return 4.0 * pairs * d / (ms * 1e-3) / 1e12


def forward(name, shape, plan_density, block, device, dtype, smoke, backend, log) -> dict:
    """(b): one transformer forward, stock dense (cuDNN) vs radial on a sparse step."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = WanTransformer3DModel(**shape["config"])
    model = model.to(dtype=dtype).eval()
    _sync(device)
    build_s = time.perf_counter() - t0
    latent = torch.randn(shape["latent"], device=device, dtype=dtype)
    text = torch.randn(shape["text"], device=device, dtype=dtype)
    timestep = torch.tensor([500.0], device=device)

    @torch.inference_mode()
    def run():
        if smoke:
            return model(
                hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False
            )[0]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return model(
                hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False
            )[0]

    ms_dense, times_dense, _, out_dense = _time_forward(run, device)
    log(f"{name}: stock forward {ms_dense:.1f} ms (model built in {build_s:.1f} s)")

    handle = dit_accel.apply(
        model, method="radial", dense_steps=0, block_q=block, block_k=block, backend=backend
    )
    ms_sparse, times_sparse, warmup_sparse, out_sparse = _time_forward(run, device)
    records = handle.stats().records
    n_layers = len(handle.layers)
    dense_layers = {i % n_layers for i in handle.config.dense_layers}
    expected = ["dense" if handle.layers.index(r["layer"]) in dense_layers else "sparse" for r in records]
    pattern_ok = [r["kind"] for r in records] == expected and all(
        math.isclose(r["density"], plan_density) for r, e in zip(records, expected) if e == "sparse"
    )
    finite = bool(torch.isfinite(out_sparse).all())
    method = handle.method
    res = {
        "knobs": {
            "decay": method.decay,
            "sink_frame": method.sink_frame,
            "window": method.window,
            "dense_layers": list(handle.config.dense_layers),
            "block": handle.config.block_q,
            "dense_steps": handle.config.dense_steps,
        },
        "layers": n_layers,
        "ms": {"stock_dense": ms_dense, "radial_sparse_step": ms_sparse},
        "times_ms": {"stock_dense": times_dense, "radial_sparse_step": times_sparse},
        # The first radial forward over a timed one: plan build, Triton autotuning/compilation.
        "radial_first_call_extra_s": (warmup_sparse - ms_sparse) / 1e3,
        "plan_builds": method.plan_builds,
        "stats_pattern_ok": pattern_ok,
        "output_finite": finite,
        "vs_stock": {"cosine": _cosine(out_sparse, out_dense), "rel_err": rel_err(out_sparse, out_dense)},
        "model_build_s": build_s,
    }
    res["speedup_sparse_step"] = ms_dense / ms_sparse if pattern_ok and finite else None
    log(
        f"{name}: radial forward {ms_sparse:.1f} ms, cos {res['vs_stock']['cosine']:.4f}, "
        f"rel err {res['vs_stock']['rel_err']:.3f}{'' if pattern_ok else ' (unexpected stats pattern)'}"
    )
    dit_accel.remove(model)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def composed(t_dense: float, t_sparse: float) -> dict:
    """(c): transformer time over a 50-step run with the dense warm-up, relative to all-dense."""
    cases = {
        f"{REFERENCE_DENSE_STEPS}_of_{STEPS}": REFERENCE_DENSE_STEPS,
        "dense_steps_0.25": dit_accel.SparseAttentionConfig(dense_steps=0.25).num_dense_steps(STEPS),
        "no_warmup": 0,
    }
    out = {}
    for label, n_dense in cases.items():
        ratio = (n_dense * t_dense + (STEPS - n_dense) * t_sparse) / (STEPS * t_dense)
        out[label] = {"dense_steps": n_dense, "time_ratio": ratio, "speedup": 1.0 / ratio}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the code paths)")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--skip-forward", action="store_true", help="attention-only (a) and densities")
    args = parser.parse_args(argv)

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA device (use --smoke on CPU)")
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    default_shapes = "smoke_a,smoke_b" if smoke else "wan1.3b_480p_81f,wan14b_720p_81f"
    names = (args.shapes or default_shapes).split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
    out_path = args.out or Path(__file__).parent / "results" / f"radial_{gpu_tag()}.json"
    defaults = WAN.defaults["radial"]
    block = 16 if smoke else 128

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = {
        "benchmark": "bench_radial",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "versions": versions(),
        "timer": (
            "perf_counter median of 3"
            if smoke
            else "attention: triton.testing.do_bench median; forward: median of 3 after 1 warm-up"
        ),
        "knobs": {
            "decay": defaults["decay"],
            "sink_frame": defaults["sink_frame"],
            "window": "raster",
            "block": block,
        },
        "shapes": {},
    }
    for name in names:
        shape = SHAPES[name]
        _, _, frames, lat_h, lat_w = shape["latent"]
        grid = (frames, lat_h // 2, lat_w // 2)
        t0 = time.perf_counter()
        plan = build_plan(*grid, block=block, decay=defaults["decay"], sink_frame=defaults["sink_frame"])
        plan_s = time.perf_counter() - t0
        density = plan.density()
        res = {"grid": list(grid), "tokens": math.prod(grid), "plan_density": density, "plan_build_s": plan_s}
        log(f"{name}: grid {grid}, radial density {density:.4f} (plan built in {plan_s:.2f} s)")
        res["attention"] = attention_only(
            name, shape, plan.to(device), device, dtype, smoke, args.backend, log
        )
        if not args.skip_forward:
            fwd = forward(name, shape, density, block, device, dtype, smoke, args.backend, log)
            dense_layers = len(fwd["knobs"]["dense_layers"])
            # Share of attention computed on a sparse step (dense layers count as density 1).
            fwd["mean_density_sparse_step"] = (dense_layers + (fwd["layers"] - dense_layers) * density) / fwd[
                "layers"
            ]
            res["forward"] = fwd
            ok = res["attention"]["correct"] and fwd["speedup_sparse_step"] is not None
            res["composed_50_steps"] = (
                composed(fwd["ms"]["stock_dense"], fwd["ms"]["radial_sparse_step"]) if ok else None
            )
        result["shapes"][name] = res

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))
    print(f"wrote {out_path}")
    return result


def _table(result: dict) -> str:
    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    lines = [
        f"radial on {result['device']} ({result['dtype']}), decay {result['knobs']['decay']}, "
        f"sink {result['knobs']['sink_frame']}, block {result['knobs']['block']}",
        f"{'shape':<18}{'density':>8}{'attn ms':>10}{'sdpa ms':>10}{'attn x':>8}"
        f"{'fwd ms':>10}{'dense ms':>10}{'fwd x':>7}{'cos':>8}{'50st x(12)':>11}",
    ]
    for name, r in result["shapes"].items():
        a, f, c = r["attention"], r.get("forward"), r.get("composed_50_steps")
        fwd_ms = (f["ms"]["radial_sparse_step"], f["ms"]["stock_dense"]) if f else (None, None)
        lines.append(
            f"{name:<18}{r['plan_density']:>8.3f}{a['ms']['radial_sparse']:>10.2f}{a['ms']['sdpa_dense']:>10.2f}"
            f"{fmt(a['speedup_vs_sdpa_dense']):>8}{fmt(fwd_ms[0], '.1f'):>10}{fmt(fwd_ms[1], '.1f'):>10}"
            f"{fmt(f and f['speedup_sparse_step']):>7}{fmt(f and f['vs_stock']['cosine'], '.4f'):>8}"
            f"{fmt(c and c[f'{REFERENCE_DENSE_STEPS}_of_{STEPS}']['speedup']):>11}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
