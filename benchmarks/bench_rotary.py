"""The rotary step of each fused convention against the stock diffusers ops it replaces, on the GPU.

For each shape: the stock ops (Wan's processor arithmetic; ``apply_rotary_emb`` on q and k, with
HunyuanVideo's concatenation of the unrotated text suffix in its single-stream blocks) and
``dit_accel.kernels.rotary_interleaved`` on the same inputs; outputs must be bit-identical, then both are
timed with ``triton.testing.do_bench`` (median ms). Per-step savings follow from the block counts.
CogVideoX keeps q and k in (B, H, S, D) with the text first and writes the rotated video tokens back in
place; both sides do that write here.

    source benchmarks/gpu_env.sh && python3 benchmarks/bench_rotary.py --out PATH.json     # about 30 s
"""

from __future__ import annotations

import argparse
import json
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    import triton

    from dit_accel.kernels import rotary_interleaved

    report = {"benchmark": "bench_rotary", "device": torch.cuda.get_device_name(), "rows": []}
    for name in args.shapes.split(","):
        convention, rotated, suffix, heads, d, table_dtype, calls = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        seq = rotated + suffix
        q = torch.randn(1, seq, heads * d, device="cuda", generator=g).bfloat16().unflatten(2, (heads, d))
        k = torch.randn(1, seq, heads * d, device="cuda", generator=g).bfloat16().unflatten(2, (heads, d))
        if convention == "cogvideox":  # (B, H, S, D), contiguous, text first
            q, k = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
        angle = torch.rand(rotated, d // 2, device="cuda", generator=g, dtype=torch.float64) * 100
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
        stock_ms = triton.testing.do_bench(run_stock)
        fused_ms = triton.testing.do_bench(run_fused)
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
