"""A/B of re-ttention's refresh paths: what one refresh call costs on the GPU and on the host.

- ``fused``: ``refresh_attention``, the one-pass refresh kernel (dense output, rho and R over the same key
  tiles);
- ``split``: a dense pass with its LSE (``dense_attention``, backend "auto" as the method runs it) and
  ``mask_statistics``, one pass over the plan's blocks whose epilogue writes rho and R;
- ``split_torch``: the same dense pass, a sparse pass with its LSE and the statistics from ~15 torch ops
  (``correction_from_outputs``), the two-pass refresh before ``mask_statistics``;
- ``split_cudnn`` (GPU): ``split`` with the dense pass on cuDNN (what "auto" picks where the dense table has a
  row for cuDNN; at the embedded shape it has none and runs our Triton loop);
- ``cudnn``: one cuDNN attention, the cost of the dense step a refresh replaces.

Shapes: the embedded model's attention (6 heads, 2,496 tokens, head_dim 64) with the per-frame window plan it
runs (16-token blocks) and Wan-1.3B 480p (12 heads, 32,760 tokens, head_dim 128, 128-token blocks), at window
density 0.05 (and 0.3 and 0.5 at Wan-1.3B: ``DENSITIES``). Per row: the paths checked against each other
(output, rho and R must agree to rounding), then timed two ways in interleaved rounds, with the call cache on
as a model runs them:

- ``gpu_ms``: ``triton.testing.do_bench`` median (L2 flushed between calls): the GPU's time;
- ``wall_us``: wall time per call of 200 calls issued back to back, one synchronisation at the end: what a
  model whose host is slower than its GPU (the embedded model) sees, the larger of host and GPU time.

    source benchmarks/gpu_env.sh && python3 benchmarks/ab_refresh_paths.py --out PATH.json     # about 4 min
    python benchmarks/ab_refresh_paths.py --smoke --out /tmp/ab_refresh_paths.json          # CPU interpreter
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import ab_args, add_row, interleaved_ms, rel_err, versions, window_case  # noqa: E402

# name: (heads, head_dim, latent grid T x H x W)
SHAPES = {"embedded": (6, 64, (13, 12, 16)), "wan1.3b_480p_81f": (12, 128, (21, 30, 52))}
SMOKE = {"smoke": (2, 32, (3, 4, 8))}
# Window densities per shape: 0.05 as the presets run it; at Wan-1.3B also 0.3 and 0.5, on either side of
# where "auto" switches to the one-pass kernel (AUTO_SPLIT_BELOW), to place the crossover.
DENSITIES = {"embedded": (0.05,), "wan1.3b_480p_81f": (0.05, 0.3, 0.5), "smoke": (0.05,)}
TOL = {"out": 1e-2, "rho": 2e-3, "residual": 3e-2}
WALL_CALLS = 200


def paths(q, k, v, plan) -> dict:
    """name -> a callable returning (out, SoftmaxCorrection) (``cudnn``: the output alone)."""
    from dit_accel.kernels import correction_from_outputs, dense_attention, mask_statistics, refresh_attention

    def fused():
        out, _, corr = refresh_attention(q, k, v, plan)
        return out, corr

    def split():
        out, lse = dense_attention(q, k, v)
        return out, mask_statistics(q, k, v, plan, out, lse)

    def split_torch():
        from dit_accel.kernels import block_sparse_attention

        out, lse = dense_attention(q, k, v)
        out_in, lse_in = block_sparse_attention(q, k, v, plan)
        return out, correction_from_outputs(out, lse, out_in, lse_in)

    out = {"fused": fused, "split": split, "split_torch": split_torch}
    if q.is_cuda:

        def split_cudnn():
            out, lse = dense_attention(q, k, v, backend="cudnn")
            return out, mask_statistics(q, k, v, plan, out, lse)

        out["split_cudnn"] = split_cudnn
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return sdpa(qh, kh, vh)

        out["cudnn"] = cudnn
    return out


def wall_us(fns: dict, rounds: int = 3) -> dict[str, float]:
    """Median over interleaved rounds of the wall time per call of ``WALL_CALLS`` calls issued back to
    back."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(WALL_CALLS):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / WALL_CALLS * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_shape(name, heads, d, grid, density, smoke, rep_ms) -> dict:
    from dit_accel.kernels.reference import dequantize_residual

    plan, (q, k, v), row = window_case(name, heads, d, grid, density, smoke)
    fns = paths(q, k, v, plan)
    got = {n: fn() for n, fn in fns.items() if n != "cudnn"}
    base_out, base = got["fused"]
    errs = {}
    for n, (out, corr) in got.items():
        if n == "fused":
            continue
        errs[n] = {
            "out": rel_err(out, base_out),
            "rho": float((corr.rho - base.rho).abs().max()),
            "residual": rel_err(
                dequantize_residual(corr.residual, corr.residual_scale),
                dequantize_residual(base.residual, base.residual_scale),
            ),
        }
    row["errors_vs_fused"] = errs
    row["ok"] = all(e[key] <= tol for e in errs.values() for key, tol in TOL.items())
    if row["ok"] and not smoke:
        row["gpu_ms"] = interleaved_ms(fns, rep_ms)
        row["wall_us"] = wall_us(fns)
        for metric in ("gpu_ms", "wall_us"):
            row[f"{metric}_vs_fused"] = {n: t / row[metric]["fused"] for n, t in row[metric].items()}
    return row


def main(argv=None) -> dict:
    args = ab_args(__doc__, argv)
    device = "cpu" if args.smoke else torch.cuda.get_device_name()
    report = {"benchmark": "ab_refresh_paths", "device": device, "versions": versions(), "rows": []}
    for name, (heads, d, grid) in (SMOKE if args.smoke else SHAPES).items():
        for density in DENSITIES[name]:
            add_row(report, run_shape(name, heads, d, grid, density, args.smoke, args.rep_ms), args.out)
    return report


if __name__ == "__main__":
    main()
