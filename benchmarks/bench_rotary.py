"""The rotary step of each fused convention against the stock diffusers ops it replaces, on the GPU.

For each shape: the stock ops (Wan's processor arithmetic; ``apply_rotary_emb`` on q and k, with
HunyuanVideo's concatenation of the unrotated text suffix in its single-stream blocks) and
``dit_accel.kernels.rotary_interleaved`` on the same inputs; outputs must be bit-identical, then both are
timed with ``triton.testing.do_bench`` (median ms). Per-step savings follow from the block counts.
CogVideoX keeps q and k in (B, H, S, D) with the text first and writes the rotated video tokens back in
place; both sides do that write here.

    source benchmarks/gpu_env.sh && python3 benchmarks/bench_rotary.py --out PATH.json     # about 30 s

``--smoke`` runs the same code on the CPU (Triton's interpreter, float16, every shape shrunk, one timed call):
``tests/test_bench_rotary.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# name: (convention, rotated tokens, unrotated suffix, heads, head_dim, table dtype, attention calls per step)
SHAPES = {
    "wan1.3b_480p_81f": ("wan", 32760, 0, 12, 128, torch.float64, 60),
    "hunyuan_720p_129f_single": ("apply_rotary_emb", 118800, 256, 24, 128, torch.float32, 40),
    "hunyuan_720p_129f_dual": ("apply_rotary_emb", 118800, 0, 24, 128, torch.float32, 20),
    "flux_1024": ("apply_rotary_emb", 4608, 0, 24, 128, torch.float32, 57),  # 4,096 image + 512 text tokens
    "cogvideox5b_49f": ("cogvideox", 17550, 226, 48, 64, torch.float32, 84),  # 42 blocks, 2 CFG calls
}


def cogvideox(q, k, cos, sin, fused):
    """CogVideoX's processor step on (B, H, S, D) q and k: the video tokens, after the text, rotated in
    place."""
    from diffusers.models.embeddings import apply_rotary_emb

    from dit_accel.kernels import rotary_interleaved

    q, k = q.clone(), k.clone()  # the step writes in place; the inputs stay as they are
    text = q.shape[2] - cos.shape[1]
    if fused:
        video_q, video_k = rotary_interleaved(
            q[:, :, text:].transpose(1, 2), k[:, :, text:].transpose(1, 2), cos, sin, "triton",
            convention="apply_rotary_emb",
        )  # fmt: skip
        q[:, :, text:], k[:, :, text:] = video_q.transpose(1, 2), video_k.transpose(1, 2)
    else:
        freqs = (cos[0, :, 0], sin[0, :, 0])
        q[:, :, text:] = apply_rotary_emb(q[:, :, text:], freqs)
        k[:, :, text:] = apply_rotary_emb(k[:, :, text:], freqs)
    return q, k


def stock(convention, q, k, cos, sin, rotated):
    from diffusers.models.embeddings import apply_rotary_emb

    from dit_accel.kernels.reference import rotary_interleaved_reference

    if convention == "wan":
        return rotary_interleaved_reference(q, cos, sin), rotary_interleaved_reference(k, cos, sin)
    freqs = (cos[0, :, 0], sin[0, :, 0])
    if rotated == q.shape[1]:
        return apply_rotary_emb(q, freqs, sequence_dim=1), apply_rotary_emb(k, freqs, sequence_dim=1)
    return tuple(
        torch.cat([apply_rotary_emb(x[:, :rotated], freqs, sequence_dim=1), x[:, rotated:]], dim=1)
        for x in (q, k)
    )


def _do_bench_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn)


def _smoke_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.shapes.split(",")) - set(SHAPES))
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (or --smoke)")
    device, dtype = ("cpu", torch.float16) if args.smoke else ("cuda", torch.bfloat16)
    timer = _smoke_ms if args.smoke else _do_bench_ms

    from dit_accel.kernels import rotary_interleaved

    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report = {"benchmark": "bench_rotary", "device": gpu, "dtype": str(dtype), "rows": []}
    for name in args.shapes.split(","):
        convention, rotated, suffix, heads, d, table_dtype, calls = SHAPES[name]
        if args.smoke:
            rotated, suffix, heads, d = max(rotated // 4000, 3), min(suffix, 3), 2, min(d, 16)
        g = torch.Generator(device=device).manual_seed(0)
        seq = rotated + suffix
        q = torch.randn(1, seq, heads * d, device=device, generator=g).to(dtype).unflatten(2, (heads, d))
        k = torch.randn(1, seq, heads * d, device=device, generator=g).to(dtype).unflatten(2, (heads, d))
        if convention == "cogvideox":  # (B, H, S, D), contiguous, text first
            q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        angle = torch.rand(rotated, d // 2, device=device, generator=g, dtype=torch.float64) * 100
        cos = angle.cos().repeat_interleave(2, -1).to(table_dtype)[None, :, None]
        sin = angle.sin().repeat_interleave(2, -1).to(table_dtype)[None, :, None]
        if convention == "cogvideox":

            def run_stock():
                return cogvideox(q, k, cos, sin, fused=False)

            def run_fused():
                return cogvideox(q, k, cos, sin, fused=True)
        else:

            def run_stock():
                return stock(convention, q, k, cos, sin, rotated)

            def run_fused():
                return rotary_interleaved(q, k, cos, sin, "triton", convention=convention, rotary_len=rotated)

        exact = all(torch.equal(a, b) for a, b in zip(run_fused(), run_stock()))
        stock_ms, fused_ms = timer(run_stock), timer(run_fused)
        row = {
            "shape": name,
            "convention": convention,
            "tokens": seq,
            "rotated": rotated,
            "heads": heads,
            "head_dim": d,
            "table_dtype": str(table_dtype),
            "bit_exact": exact,
            "stock_ms": stock_ms,
            "fused_ms": fused_ms,
            "calls_per_step": calls,
            "saved_ms_per_step": (stock_ms - fused_ms) * calls,
        }
        report["rows"].append(row)
        print(
            f"{name}: exact {exact}, stock {stock_ms:.3f} ms, fused {fused_ms:.3f} ms "
            f"({stock_ms / fused_ms:.1f}x), {row['saved_ms_per_step']:.0f} ms per step over {calls} calls"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
