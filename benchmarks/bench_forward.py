"""One Wan2.1-1.3B transformer forward (random weights, real config): stock, dit_accel dense, dit_accel
window, and with attention replaced by a no-op (the attention share of the forward); dit_accel dense and
window also with ``cuda_graphs=True`` (the forward replayed as a CUDA graph: time and memory kept); the dense
method with the stock arithmetic for Wan's RoPE, and the rotary step alone, stock against fused. Also the
dense method on each ``dense_backend`` that is not the stock op (auto, cudnn, xformers, triton) as a dense
baseline of its own: its output against stock, its time, or why it cannot run.

GPU run (bf16, latent (1, 16, 21, 60, 104) = 480p 81 frames, 32,760 tokens; text (1, 512, 4096)):

    python benchmarks/bench_forward.py [--out benchmarks/results/forward_wan1.3b_<gpu>.json]

CPU smoke run of the same code paths on a tiny config (fp32, perf_counter medians):

    python benchmarks/bench_forward.py --smoke --out /tmp/forward_smoke.json

Times are medians of ``triton.testing.do_bench`` on GPU. Before timing, the dit_accel dense forward must equal
the stock forward and the window method at density 1.0 must match it within bf16 tolerance; otherwise no
speedup is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from _common import WAN_1_3B, bench, gpu_tag, versions
from diffusers import WanTransformer3DModel

import dit_accel
from dit_accel.methods import SparseMethod

WAN_TINY = {
    **WAN_1_3B,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "text_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}
DENSE_BACKENDS = ("auto", "cudnn", "xformers", "triton")
SHAPES = {
    "wan1.3b_480p_81f": {"latent": (1, 16, 21, 60, 104), "text": (1, 512, 4096), "block": 128},
    "smoke": {"latent": (1, 16, 3, 8, 12), "text": (1, 8, 32), "block": 16},
}


class NoAttention(SparseMethod):
    """Attention replaced by a no-op (returns v): the forward without attention."""

    name = "no-attention"

    def attention(self, q, k, v, call):
        return v


def _rope_times(model, latent, smoke: bool) -> dict:
    """Wan's rotary step on one layer's q and k: the stock arithmetic against the fused kernel (the same
    bits; on the CPU both run the reference)."""
    from dit_accel.kernels import rotary_interleaved

    cos, sin = model.rope(latent)
    heads = model.config.num_attention_heads
    shape = (latent.shape[0], cos.shape[1], heads, model.config.attention_head_dim)
    q, k = (torch.randn(shape, device=latent.device, dtype=latent.dtype) for _ in range(2))
    backend = "torch" if smoke else "triton"
    fused = rotary_interleaved(q, k, cos, sin, backend=backend)
    stock = rotary_interleaved(q, k, cos, sin, backend="torch")
    return {
        "tables_dtype": str(cos.dtype).replace("torch.", ""),
        "equal": all(torch.equal(a, b) for a, b in zip(fused, stock)),
        "stock": bench(lambda: rotary_interleaved(q, k, cos, sin, backend="torch"), smoke, rep_ms=300),
        "fused": bench(lambda: rotary_interleaved(q, k, cos, sin, backend=backend), smoke, rep_ms=300),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny config on CPU (checks the code paths)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    parser.add_argument("--density", type=float, default=0.1, help="window method density")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    args = parser.parse_args(argv)

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA device (use --smoke on CPU)")
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    shape_name = "smoke" if smoke else "wan1.3b_480p_81f"
    shape = SHAPES[shape_name]
    out_path = args.out or Path(__file__).parent / "results" / f"forward_wan1.3b_{gpu_tag()}.json"

    torch.manual_seed(0)
    config = WAN_TINY if smoke else WAN_1_3B
    model = WanTransformer3DModel(**config).to(device=device, dtype=dtype).eval()
    latent = torch.randn(shape["latent"], device=device, dtype=dtype)
    text = torch.randn(shape["text"], device=device, dtype=dtype)
    timestep = torch.tensor([500.0], device=device)
    block = shape["block"]

    @torch.inference_mode()
    def forward():
        out = model(hidden_states=latent, timestep=timestep, encoder_hidden_states=text, return_dict=False)
        return out[0]

    result = {
        "benchmark": "bench_forward",
        "shape": shape_name,
        "latent": list(shape["latent"]),
        "text": list(shape["text"]),
        "tokens": shape["latent"][2] * (shape["latent"][3] // 2) * (shape["latent"][4] // 2),
        "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": versions(),
        "timer": "perf_counter median of 3" if smoke else "triton.testing.do_bench median",
        "block": block,
        "backend": args.backend,
    }

    stock = forward()
    ms_stock = bench(forward, smoke, rep_ms=1000, warmup_ms=100)

    handle = dit_accel.apply(model, method="dense")
    dense_out = forward()
    dense_exact = bool(torch.equal(dense_out, stock))
    ms_dense = bench(forward, smoke, rep_ms=1000, warmup_ms=100)
    # The same with the stock arithmetic for Wan's RoPE (backend="torch": on the dense method with the stock
    # attention op, the rotary step is all that changes), and the rotary step alone on the forward's q, k.
    dit_accel.apply(model, method="dense", backend="torch")
    ms_dense_stock_rope = bench(forward, smoke, rep_ms=1000, warmup_ms=100)
    rope = _rope_times(model, latent, smoke)

    dense_backends = {}
    for name in DENSE_BACKENDS:
        dit_accel.apply(model, method="dense", dense_backend=name)
        try:
            out = forward()
        except RuntimeError as exc:
            dense_backends[name] = {"error": str(exc)}
            continue
        err = ((out.float() - stock.float()).abs().max() / stock.float().abs().max().clamp_min(1e-6)).item()
        row = {"rel_err": err, "correct": err <= (1e-5 if smoke else 3e-2)}
        if row["correct"]:
            row["ms"] = bench(forward, smoke, rep_ms=1000, warmup_ms=100)
            row["speedup_vs_stock"] = ms_stock / row["ms"]
        dense_backends[name] = row

    dit_accel.apply(model, method="window", density=1.0, block_q=block, block_k=block, backend=args.backend)
    full = forward()
    full_err = ((full.float() - stock.float()).abs().max() / stock.float().abs().max().clamp_min(1e-6)).item()
    full_ok = full_err <= (1e-5 if smoke else 3e-2)

    window_knobs = {"method": "window", "density": args.density, "backend": args.backend}
    window_knobs.update(block_q=block, block_k=block)
    handle = dit_accel.apply(model, **window_knobs)
    window_out = forward()
    window_density = handle.stats().records[0]["density"]
    ms_window = bench(forward, smoke, rep_ms=1000, warmup_ms=100)

    # The same forwards replayed as CUDA graphs (cuda_graphs=True): equal outputs first, then the time and
    # the memory the captured forward keeps (on the CPU every forward runs eagerly).
    graphs = {}
    for name, knobs, eager_out, eager_ms in (
        ("dit_accel_dense", {"method": "dense"}, dense_out, ms_dense),
        ("window", window_knobs, window_out, ms_window),
    ):
        handle = dit_accel.apply(model, cuda_graphs=True, **knobs)
        reserved = torch.cuda.memory_reserved() if device.type == "cuda" else 0
        out = [forward() for _ in range(3)][-1]  # eager, captured, replayed
        row = {"equal_to_eager": bool(torch.equal(out, eager_out)), "forwards": handle.stats().graphs}
        if device.type == "cuda":
            row["reserved_bytes_added"] = torch.cuda.memory_reserved() - reserved
        if row["equal_to_eager"]:
            row["ms"] = bench(forward, smoke, rep_ms=1000, warmup_ms=100)
            row["speedup_vs_eager"] = eager_ms / row["ms"]
        graphs[name] = row

    dit_accel.apply(model, method=NoAttention())
    ms_noattn = bench(forward, smoke, rep_ms=1000, warmup_ms=100)
    dit_accel.remove(model)

    correct = dense_exact and full_ok
    result.update(
        {
            "correct": correct,
            "checks": {"dense_equals_stock": dense_exact, "full_density_rel_err": full_err},
            "ms": {
                "stock": ms_stock,
                "dit_accel_dense": ms_dense,
                "dit_accel_dense_stock_rope": ms_dense_stock_rope,
                "window": ms_window,
                "no_attention": ms_noattn,
            },
            "dense_backends": dense_backends,
            "cuda_graphs": graphs,
            "rope_ms": rope,
            "window_density": window_density,
            "attention_share": 1.0 - ms_noattn / ms_stock,
            "attention_only_ceiling": ms_stock / ms_noattn,
            "speedup_window": ms_stock / ms_window if correct else None,
            "overhead_dense": ms_dense / ms_stock - 1.0,
        }
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not correct:
        print("correctness check failed: no speedup reported", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
