"""Kernel benchmark: dit_accel block-sparse attention vs cuDNN SDPA (dense) and FlexAttention (same mask).

For each named shape config and each (pattern, density): build a 128x128 block plan, check our output
against FlexAttention on the same mask (and, at density 1, against cuDNN), then time all of them with
``triton.testing.do_bench`` medians in the same process. A kernel that fails its check gets no speedup
reported. Also times ``block_mass`` (with the fresh dense LSE; its rows must sum to the row counts) and
``dense_attention``'s paths against one cuDNN dense attention.

Usage (GPU):  python benchmarks/bench_kernels.py [--configs wan1.3b_480p_81f,...] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
from _common import bench, rel_err

CONFIGS = {
    # name: (B, H, S, D)
    "wan1.3b_480p_81f": (1, 12, 32760, 128),
    "wan14b_720p_81f": (1, 40, 75600, 128),
    "hunyuan_720p_129f": (1, 24, 119056, 128),
    "cogvideox5b_49f": (1, 48, 17776, 64),
    "flux_1024": (1, 24, 4608, 128),
    "pixart_2k": (1, 16, 16384, 72),
}
DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
PATTERNS = ("local", "random")
BLOCK = 128


def make_mask(pattern: str, heads: int, n_qb: int, n_kb: int, density: float, seed: int = 0) -> torch.Tensor:
    """Boolean block mask [1, H, n_qb, n_kb] with round(density * n_kb) blocks in every row."""
    k = max(1, min(n_kb, round(density * n_kb)))
    if pattern == "local":
        p = torch.arange(n_qb)
        start = (p * n_kb // n_qb - k // 2).clamp(0, n_kb - k)
        cols = start[:, None] + torch.arange(k)[None, :]
        mask = torch.zeros(n_qb, n_kb, dtype=torch.bool)
        mask.scatter_(1, cols, True)
        return mask[None, None].expand(1, heads, n_qb, n_kb).clone()
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, heads, n_qb, n_kb, generator=g)
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros(1, heads, n_qb, n_kb, dtype=torch.bool).scatter_(-1, idx, True)


def computed_pairs(mask: torch.Tensor, seq: int, block: int) -> int:
    """Number of (query, key) pairs inside computed blocks, tails counted exactly."""
    n = mask.shape[-1]
    sizes = torch.full((n,), block, dtype=torch.float64)
    sizes[-1] = seq - block * (n - 1)
    return int(torch.einsum("bhpq,p,q->", mask.double(), sizes, sizes).item())


def tflops(pairs: int, batch: int, d: int, ms: float) -> float:
    return 4.0 * batch * pairs * d / (ms * 1e-3) / 1e12


def run_config(name, batch, heads, seq, d, densities, patterns, rep_ms, log):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from dit_accel.kernels import BlockPlan, block_mass, block_sparse_attention, dense_attention

    flex = torch.compile(flex_attention, dynamic=False)
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (
        torch.randn(batch, seq, heads, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3)
    )
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # SDPA / Flex layout views, no copies
    n = math.ceil(seq / BLOCK)
    dense_pairs = seq * seq
    res = {"config": name, "B": batch, "H": heads, "S": seq, "D": d, "rows": []}

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)

    ref_dense = cudnn()
    ms_cudnn = bench(cudnn, rep_ms=rep_ms)
    res["cudnn_ms"] = ms_cudnn
    res["cudnn_tflops"] = tflops(dense_pairs * heads, batch, d, ms_cudnn)
    log(f"{name}: cuDNN dense {ms_cudnn:.2f} ms ({res['cudnn_tflops']:.0f} TF/s)")

    # dense_attention paths (with LSE)
    for backend in ("cudnn", "triton"):
        try:
            out, lse = dense_attention(q, k, v, backend=backend)
            err = rel_err(out.transpose(1, 2), ref_dense)
            ms = bench(lambda b=backend: dense_attention(q, k, v, backend=b), rep_ms=rep_ms)
            res[f"dense_attention_{backend}_ms"] = ms
            res[f"dense_attention_{backend}_err"] = err
            log(f"  dense_attention[{backend}] {ms:.2f} ms err {err:.1e}")
            if backend == "triton":
                dense_lse = lse
        except Exception as exc:  # noqa: BLE001 - record and continue
            res[f"dense_attention_{backend}_error"] = repr(exc)[:300]
            log(f"  dense_attention[{backend}] failed: {exc!r}"[:300])

    # block_mass with the fresh LSE: each row must sum to its number of rows.
    w = block_mass(q, k, dense_lse, BLOCK, BLOCK)
    rows = torch.full((n,), float(BLOCK), device=dev)
    rows[-1] = seq - BLOCK * (n - 1)
    mass_err = float(((w.sum(-1) - rows) / rows).abs().max())
    ms_mass = bench(lambda: block_mass(q, k, dense_lse, BLOCK, BLOCK), rep_ms=rep_ms)
    res.update(block_mass_ms=ms_mass, block_mass_rowsum_err=mass_err, block_mass_vs_cudnn=ms_mass / ms_cudnn)
    log(f"  block_mass {ms_mass:.2f} ms = {ms_mass / ms_cudnn:.2f} x cuDNN (row-sum err {mass_err:.1e})")

    for pattern in patterns:
        for dens in densities:
            mask = make_mask(pattern, heads, n, n, dens)
            pairs = computed_pairs(mask, seq, BLOCK) * 1  # per batch element, summed over heads
            plan = BlockPlan.from_block_mask(mask.to(dev), BLOCK, BLOCK)
            counts = plan.kv_counts.expand(batch, heads, n).contiguous()
            idx = torch.zeros(batch, heads, n, n, dtype=torch.int32, device=dev)
            idx[..., : plan.max_k] = plan.kv_indices.expand(batch, heads, n, plan.max_k)
            bm = BlockMask.from_kv_blocks(
                torch.zeros_like(counts), idx, counts, idx, BLOCK_SIZE=BLOCK, seq_lengths=(seq, seq)
            )
            row = {"pattern": pattern, "density_target": dens, "density": plan.density()}
            out, _ = block_sparse_attention(q, k, v, plan)
            ref = flex(qh, kh, vh, block_mask=bm)
            row["err_vs_flex"] = rel_err(out.transpose(1, 2), ref)
            ok = row["err_vs_flex"] < 2e-2
            if dens == 1.0:
                row["err_vs_cudnn"] = rel_err(out.transpose(1, 2), ref_dense)
                ok = ok and row["err_vs_cudnn"] < 2e-2
            row["correct"] = ok
            row["ours_ms"] = bench(lambda: block_sparse_attention(q, k, v, plan), rep_ms=rep_ms)
            row["flex_ms"] = bench(lambda: flex(qh, kh, vh, block_mask=bm), rep_ms=rep_ms)
            row["ours_tflops"] = tflops(pairs, batch, d, row["ours_ms"])
            row["flex_tflops"] = tflops(pairs, batch, d, row["flex_ms"])
            if ok:
                row["ours_tflops_vs_cudnn"] = row["ours_tflops"] / res["cudnn_tflops"]
                row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
                row["speedup_vs_cudnn_dense"] = ms_cudnn / row["ours_ms"]
            res["rows"].append(row)
            log(
                f"  {pattern:6s} d={row['density']:.3f} ours {row['ours_ms']:8.2f} ms"
                f" {row['ours_tflops']:4.0f} TF/s"
                f" | flex {row['flex_ms']:8.2f} ms {row['flex_tflops']:4.0f} TF/s"
                f" | vs cuDNN TF {row.get('ours_tflops_vs_cudnn', float('nan')):.2f}"
                f" vs flex {row.get('speedup_vs_flex', float('nan')):.2f}x"
                f" | err flex {row['err_vs_flex']:.1e}{'' if ok else '  FAILED CHECK'}"
            )
    return res


SWEEP_VARIANTS = [
    # (BLOCK_M, BLOCK_N, num_warps, num_stages, USE_TMA, DENSE loop)
    (128, 128, 8, 3, False, False),
    (128, 128, 8, 3, True, False),
    (128, 128, 8, 2, True, False),
    (128, 128, 8, 4, True, False),
    (128, 64, 8, 3, True, False),
    (64, 64, 4, 3, True, False),
    (64, 128, 4, 3, True, False),
    (128, 128, 8, 3, True, True),
    (128, 128, 8, 2, True, True),
]


def variant_call(q, k, v, plan, variant):
    """A call that launches the sparse kernel on (B, H, S, D) views with one fixed ``variant`` (a row of
    SWEEP_VARIANTS), bypassing the autotuner, and returns the launch's (out, lse). The launch is the one
    ``sparse_attention_fwd`` makes, recorded, with the variant's tile, launch options and loop in place of the
    tuned ones: every other argument stays what the kernel's own launcher passes."""
    from dit_accel.kernels.triton_attention import sparse_attention_fwd
    from dit_accel.kernels.triton_common import cdiv, recording, tma_ok

    bm, bn, warps, stages, tma, dense = variant
    batch, heads, seq, d = q.shape

    def fwd():
        return sparse_attention_fwd(q, k, v, plan.kv_indices, plan.kv_counts, plan.block_q, plan.block_k,
                                    d**-0.5, None)  # fmt: skip

    fwd()  # the first launch of a tuning key tunes; later ones are recorded
    with recording() as launches:
        out, lse = fwd()
    (rec,) = launches
    meta = {**rec.kwargs, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    meta.update(DENSE=dense, USE_TMA=tma and tma_ok(k, v))
    grid = (cdiv(seq, bm), batch * heads)

    def call():
        rec.fn[grid](*rec.args, **meta)
        return out, lse

    return call


def sweep_variants(name, rep_ms, log):
    """Time every kernel variant at one named shape (a dense plan and a 25% random plan)."""
    from dit_accel.kernels import BlockPlan
    from dit_accel.kernels.reference import attention_reference

    batch, heads, seq, d = CONFIGS[name]
    dev = "cuda"
    # (B, S, H, D) storage read through (B, H, S, D) views, as diffusers' layout is.
    q, k, v = (
        torch.randn(batch, seq, heads, d, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)
    )
    n = math.ceil(seq / BLOCK)
    rows = []
    for dens in (1.0, 0.25):
        mask = make_mask("random", heads, n, n, dens)
        plan = BlockPlan.from_block_mask(mask.to(dev), BLOCK, BLOCK)
        pairs = computed_pairs(mask, seq, BLOCK)
        # Oracle on the first two query blocks of every head.
        sub = BlockPlan(BLOCK, BLOCK, plan.kv_indices[:, :, :2], plan.kv_counts[:, :, :2], n)
        ref, _ = attention_reference(q[:, :, : 2 * BLOCK], k, v, sub, d**-0.5)
        for variant in SWEEP_VARIANTS:
            if variant[5] and dens < 1.0:
                continue  # the dense loop ignores the plan
            row = {"config": name, "density": dens, "variant": list(variant)}
            try:
                call = variant_call(q, k, v, plan, variant)
                out, _ = call()
                row["err"] = rel_err(out[:, :, : 2 * BLOCK], ref)
                row["ms"] = bench(call, rep_ms=rep_ms)
                row["tflops"] = tflops(pairs, batch, d, row["ms"])
                log(
                    f"  sweep {name} d={dens} {variant}: {row['ms']:.2f} ms {row['tflops']:.0f} TF/s"
                    f" err {row['err']:.1e}"
                )
            except Exception as exc:  # noqa: BLE001 - record the failure and keep sweeping
                row["error"] = repr(exc)[:300]
                log(f"  sweep {name} d={dens} {variant}: failed {exc!r}"[:300])
            rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument(
        "--sweep", default="", help="comma-separated configs at which to time every kernel variant"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    import triton

    gpu = torch.cuda.get_device_name()
    out_path = args.out or os.path.join(
        os.path.dirname(__file__), "results", f"kernels_{gpu.replace(' ', '_').lower()}.json"
    )
    report = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "block": BLOCK,
        "dtype": "bfloat16",
        "timing": "triton.testing.do_bench median, ms",
        "configs": [],
    }
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    def save():
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)

    report["variant_sweep"] = []
    for name in filter(None, args.sweep.split(",")):
        report["variant_sweep"] += sweep_variants(name, args.rep_ms, log)
        save()
    densities = [float(x) for x in args.densities.split(",")]
    for name in filter(None, args.configs.split(",")):
        b, h, s, d = CONFIGS[name]
        report["configs"].append(
            run_config(name, b, h, s, d, densities, args.patterns.split(","), args.rep_ms, log)
        )
        save()
        torch.cuda.empty_cache()
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
