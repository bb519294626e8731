"""A/B of the refresh kernel's two walks over the keys outside the plan (``kernels/triton_refresh.py``):
``skip`` (each key block tested against the row's sorted list, its tiles skipped when listed: a branch in
the loop) and ``masked`` (every block walked, a listed one with all its keys masked: no branch, so the key
loads can be pipelined). The kernel picks ``masked`` for plans with key blocks of at most
``MASKED_WALK_MAX_BLOCK`` tokens.

Shapes: the embedded model's attention (6 heads, 2,496 tokens, head_dim 64) with the per-frame window plan
it runs (16-token blocks, the window's cap at 192 tokens a frame) and Wan-1.3B 480p (12 heads, 32,760
tokens, head_dim 128, 128-token blocks), each at window densities 0.05 and 0.1. Per shape: both walks
checked against each other (output, LSE, rho and R must agree to rounding) and cuDNN's output, then cuDNN,
``skip`` and ``masked`` timed in interleaved rounds (``triton.testing.do_bench``, median). The call cache is
off: each timed call launches its variant.

    source benchmarks/gpu_env.sh && python3 benchmarks/ab_refresh_walk.py --out PATH.json     # about 1 min
    python benchmarks/ab_refresh_walk.py --smoke --out /tmp/ab_refresh_walk.json            # CPU interpreter
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import ab_args, add_row, interleaved_ms, rel_err, versions, window_case  # noqa: E402

# name: (heads, head_dim, latent grid T x H x W)
SHAPES = {"embedded": (6, 64, (13, 12, 16)), "wan1.3b_480p_81f": (12, 128, (21, 30, 52))}
SMOKE = {"smoke": (2, 32, (3, 4, 8))}
DENSITIES = (0.05, 0.1)
WALKS = {"skip": 0, "masked": 1 << 20}  # MASKED_WALK_MAX_BLOCK that selects each walk
TOL = {"out": 1e-2, "lse": 1e-3, "rho": 1e-3, "residual": 3e-2}


def run_shape(name, heads, d, grid, density, smoke, rep_ms) -> dict:
    from dit_accel.kernels import ops, refresh_attention, triton_refresh

    plan, (q, k, v), row = window_case(name, heads, d, grid, density, smoke)

    def refresh(walk):
        def call():
            triton_refresh.MASKED_WALK_MAX_BLOCK = WALKS[walk]
            return refresh_attention(q, k, v, plan, backend="triton")

        return call

    ops._CALL_CACHE = False  # every call launches the variant its walk selects
    got = {walk: refresh(walk)() for walk in WALKS}
    (o_s, l_s, c_s), (o_m, l_m, c_m) = got["skip"], got["masked"]
    errs = {
        "out": rel_err(o_m, o_s),
        "lse": float((l_m - l_s).abs().max()),
        "rho": float((c_m.rho - c_s.rho).abs().max()),
        "residual": rel_err(c_m.residual, c_s.residual),
    }
    if not smoke:
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        dense = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        errs["out_vs_cudnn"] = rel_err(o_m, dense)
    row["errors"] = errs
    row["ok"] = (
        all(errs[key] <= tol for key, tol in TOL.items()) and errs.get("out_vs_cudnn", 0.0) <= TOL["out"]
    )
    if row["ok"] and not smoke:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return sdpa(qh, kh, vh)

        ms = interleaved_ms({"cudnn": cudnn, **{walk: refresh(walk) for walk in WALKS}}, rep_ms)
        row["ms"] = ms
        row["vs_cudnn"] = {walk: ms[walk] / ms["cudnn"] for walk in WALKS}
        row["masked_vs_skip"] = ms["masked"] / ms["skip"]
    return row


def main(argv=None) -> dict:
    args = ab_args(__doc__, argv)
    from dit_accel.kernels import ops, triton_refresh

    default = triton_refresh.MASKED_WALK_MAX_BLOCK
    report = {"benchmark": "ab_refresh_walk", "device": "cpu" if args.smoke else torch.cuda.get_device_name(),
              "versions": versions(), "rows": []}  # fmt: skip
    try:
        for name, (heads, d, grid) in (SMOKE if args.smoke else SHAPES).items():
            for density in DENSITIES:
                add_row(report, run_shape(name, heads, d, grid, density, args.smoke, args.rep_ms), args.out)
    finally:
        triton_refresh.MASKED_WALK_MAX_BLOCK = default
        ops._CALL_CACHE = True
    return report


if __name__ == "__main__":
    main()
