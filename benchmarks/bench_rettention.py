"""Re-ttention's kernels against cuDNN at the real Wan geometries.

Per shape and per pattern (the per-frame window and radial, from the shape's latent grid) at ~5% and ~10%
block density:

- refresh: ``refresh_attention`` (dense output + rho + R in one pass; R in bf16 and in fp8) against one cuDNN
  attention (target <= 1.15x), and the two-pass alternative (cuDNN with LSE + ``mask_statistics``, our sparse
  pass whose epilogue writes rho and R);
- corrected sparse: ``block_sparse_attention`` with the correction in its epilogue against the same call
  without it (target <= 1.05x).

Correctness first: the refresh output against cuDNN's, rho and R against the two-pass computation, and the
corrected sparse output at the refresh step's own q, k, v against the dense output (the identity
rho * O_sparse + R = O). A path that fails its check is reported as failed and gets no ratio.

Usage (GPU):  python benchmarks/bench_rettention.py [--configs wan1.3b_480p_81f,wan14b_720p_81f] [--out PATH]
              python benchmarks/bench_rettention.py --smoke   (CPU, tiny shapes, the torch reference)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from _common import bench, gpu_tag, rel_err, versions

# name: (B, H, D, latent grid T x H x W)
CONFIGS = {
    "wan1.3b_480p_81f": (1, 12, 128, (21, 30, 52)),
    "wan14b_720p_81f": (1, 40, 128, (21, 45, 80)),
}
SMOKE = {"smoke": (1, 2, 32, (3, 4, 6))}
DENSITIES = (0.05, 0.1)
TOL = {"out": 2e-2, "rho": 1e-2, "residual": 5e-2, "residual_fp8": 1.5e-1, "identity": 3e-2}


def _patterns(grid, block, density):
    from dit_accel.kernels import BlockPlan
    from dit_accel.methods.radial import build_plan
    from dit_accel.methods.window import frame_window_block_mask

    out = {
        "window_per_frame": BlockPlan.from_block_mask(
            frame_window_block_mask(grid, block, block, density)[None, None], block, block
        )
    }
    if density == DENSITIES[0]:
        out["radial_wan"] = build_plan(*grid, block=block, decay=0.2, sink_frame=True)
    return out


def run_config(name, batch, heads, d, grid, smoke, rep_ms, log):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dit_accel.kernels import (
        block_sparse_attention,
        correction_from_outputs,
        dense_attention,
        mask_statistics,
        refresh_attention,
    )

    dev = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    backend = "torch" if smoke else "triton"
    block = 16 if smoke else 128
    seq = grid[0] * grid[1] * grid[2]
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    flops_dense = 4.0 * batch * heads * seq * seq * d

    def cudnn():
        if smoke:
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)

    ref = cudnn().transpose(1, 2)
    ms_cudnn = bench(cudnn, smoke, rep_ms)
    ms_cudnn_lse = bench(
        lambda: dense_attention(q, k, v, backend="torch" if smoke else "cudnn"), smoke, rep_ms
    )
    rows = []
    for density in DENSITIES:
        for pattern, plan in _patterns(grid, block, density).items():
            plan = plan.to(dev)
            row = {
                "config": name,
                "shape": [batch, heads, seq, d],
                "grid": list(grid),
                "pattern": pattern,
                "target_density": density,
                "density": plan.density(),
                "cudnn_ms": ms_cudnn,
                "cudnn_lse_ms": ms_cudnn_lse,
                "checks": {},
                "failed": [],
            }
            # --- correctness -------------------------------------------------------------------------
            out_full, lse_full = dense_attention(q, k, v, backend="torch" if smoke else "cudnn")
            out_sp, lse_sp = block_sparse_attention(q, k, v, plan, backend=backend)
            split = correction_from_outputs(out_full, lse_full, out_sp, lse_sp, residual_dtype=torch.float32)
            stats = mask_statistics(q, k, v, plan, out_full, lse_full, backend=backend)
            two_pass_checks = {
                "two_pass_rho": float((stats.rho - split.rho).abs().max()),
                "two_pass_residual": rel_err(stats.residual.float(), split.residual),
            }
            row["checks"].update(two_pass_checks)
            row["failed"] += [
                f"{key}={value:.3e}"
                for key, value in two_pass_checks.items()
                if not value <= TOL[key.rsplit("_", 1)[-1]]
            ]
            for rdt, tag in (
                (dtype, "bf16" if dtype == torch.bfloat16 else "fp32"),
                (torch.float8_e4m3fn, "fp8"),
            ):
                out, lse, corr = refresh_attention(q, k, v, plan, backend=backend, residual_dtype=rdt)
                r = corr.residual.float() * (
                    corr.residual_scale.unsqueeze(-1) if corr.residual_scale is not None else 1
                )
                checks = {
                    f"refresh_{tag}_out": rel_err(out, ref),
                    f"refresh_{tag}_rho": float((corr.rho - split.rho).abs().max()),
                    f"refresh_{tag}_residual": rel_err(r, split.residual),
                }
                fixed, _ = block_sparse_attention(
                    q, k, v, plan, backend=backend, correction=corr, clamp_rho=False
                )
                checks[f"corrected_{tag}_identity"] = rel_err(fixed, out_full)
                row["checks"].update(checks)
                limits = {
                    "out": TOL["out"],
                    "rho": TOL["rho"],
                    "residual": TOL["residual_fp8" if tag == "fp8" else "residual"],
                    "identity": TOL["residual_fp8" if tag == "fp8" else "identity"],
                }
                for key, value in checks.items():
                    kind = key.rsplit("_", 1)[-1]
                    if not (value <= limits[kind]):
                        row["failed"].append(f"{key}={value:.3e}")
                # --- timings ---------------------------------------------------------------------------
                ok = not any(tag in f for f in row["failed"])
                if ok:
                    row[f"refresh_{tag}_ms"] = bench(
                        lambda rdt=rdt: refresh_attention(q, k, v, plan, backend=backend, residual_dtype=rdt),
                        smoke,
                        rep_ms,
                    )
                    row[f"corrected_{tag}_ms"] = bench(
                        lambda corr=corr: block_sparse_attention(
                            q, k, v, plan, backend=backend, correction=corr, rho_offset=0.04
                        ),
                        smoke,
                        rep_ms,
                    )
            row["sparse_ms"] = bench(
                lambda: block_sparse_attention(q, k, v, plan, backend=backend), smoke, rep_ms
            )

            def two_pass():
                o, l = dense_attention(q, k, v, backend="torch" if smoke else "cudnn")
                return mask_statistics(q, k, v, plan, o, l, backend=backend)

            if not any(f.startswith("two_pass") for f in row["failed"]):
                row["refresh_two_pass_ms"] = bench(two_pass, smoke, rep_ms)
            for tag in ("bf16", "fp32", "fp8"):
                if f"refresh_{tag}_ms" in row:
                    row[f"refresh_{tag}_over_cudnn"] = row[f"refresh_{tag}_ms"] / ms_cudnn
                    row[f"corrected_{tag}_over_sparse"] = row[f"corrected_{tag}_ms"] / row["sparse_ms"]
            if "refresh_two_pass_ms" in row:
                row["refresh_two_pass_over_cudnn"] = row["refresh_two_pass_ms"] / ms_cudnn
            row["cudnn_tflops"] = flops_dense / (ms_cudnn * 1e-3) / 1e12
            rows.append(row)
            log(
                json.dumps(
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "checks"}
                )
            )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, torch reference")
    p.add_argument("--rep-ms", type=int, default=300)
    p.add_argument("--out")
    args = p.parse_args(argv)
    configs = SMOKE if args.smoke else {n: CONFIGS[n] for n in args.configs.split(",")}
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"rettention_{gpu_tag()}.json")
    result = {
        "gpu": gpu_tag(),
        "versions": versions(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": [],
    }
    for name, (b, h, d, grid) in configs.items():
        result["rows"] += run_config(name, b, h, d, grid, args.smoke, args.rep_ms, print)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    failed = [r for r in result["rows"] if r["failed"]]
    print(f"wrote {out}; {len(result['rows'])} rows, {len(failed)} with failed checks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
