"""Helpers shared by the benchmark scripts: timing, error metrics, environment records."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import statistics
import sys
import time

import torch


def bench(fn, smoke: bool = False, rep_ms: int = 500, warmup_ms: int | None = None) -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench`` on GPU; in smoke mode, 3 perf_counter runs."""
    if not smoke:
        import triton.testing

        warmup = warmup_ms if warmup_ms is not None else max(25, rep_ms // 4)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_ms(fns: dict, rep_ms: int, rounds: int = 3) -> dict[str, float]:
    """Median ms of each of ``fns`` (name -> callable) by ``triton.testing.do_bench``, timed in interleaved
    rounds (a slow stretch of the GPU or host hits every variant alike); the middle round is kept."""
    import triton.testing

    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def import_source_variants(variants: dict[str, dict[str, str]], entry: str, where) -> dict:
    """A/B of kernel source variants in one process: per variant, a package ``ab_<name>`` under ``where``
    holding the given files (file name -> source text; relative imports between them resolve inside the
    package, so each variant has its own autotuner and launch caches). Returns name -> its module
    ``entry``."""
    from pathlib import Path

    where = Path(where)
    for name, files in variants.items():
        pkg = where / f"ab_{name}"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        for file_name, text in files.items():
            (pkg / file_name).write_text(text)
    sys.path.insert(0, str(where))
    return {name: importlib.import_module(f"ab_{name}.{entry}") for name in variants}


def substitute(src: str, pairs, variant: str) -> str:
    """``src`` with each (old, new) text replaced; an old text no longer in the source fails loudly."""
    for old, new in pairs:
        if old not in src:
            raise SystemExit(f"variant {variant}: the source no longer contains {old.strip()[:60]!r}")
        src = src.replace(old, new)
    return src


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def wan_preset(name: str) -> dict:
    """A Wan preset as ``dit_accel.apply`` knobs (method and knobs)."""
    from dit_accel.pipelines.presets import get_preset

    p = get_preset("wan", name)
    return {"method": p.method, **p.knobs}


def gpu_tag() -> str:
    """File-name tag of the GPU ("nvidia_h200"), or "cpu"."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


def versions() -> dict:
    """Versions of the software a result depends on."""

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            mod = sys.modules.get(name)
            return getattr(mod, "__version__", None)

    import dit_accel

    return {
        "torch": torch.__version__,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
        "dit_accel": dit_accel.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }


# Real transformer configs (random weights are built from these; diffusers' defaults fill the rest).
WAN_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
# HunyuanVideo 13B: the constructor's defaults are the released config.
HUNYUAN_VIDEO: dict = {}
# FLUX.1-dev (12B): 19 double-stream and 38 single-stream blocks, guidance-distilled (no true CFG).
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_TINY = {
    **FLUX_DEV,
    "in_channels": 4,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 8,
    "axes_dims_rope": (4, 6, 6),
}
# Stable Diffusion 3.5 Large (8B): 38 joint blocks, head_dim 64.
SD35_LARGE = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
SD3_TINY = {
    **SD35_LARGE,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 8,
    "pos_embed_max_size": 32,
}
# PixArt-Sigma XL 2K (0.6B): 28 blocks, head_dim 72, text through cross-attention.
PIXART_SIGMA_2K = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 256,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 4096,
    "use_additional_conditions": False,
}
PIXART_TINY = {
    **PIXART_SIGMA_2K,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 1,
    "cross_attention_dim": 32,
    "sample_size": 32,
    "caption_channels": 32,
}
# Qwen-Image (20B): 60 double-stream blocks, head_dim 128, no guidance embedding (true CFG).
QWEN_IMAGE = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
QWEN_IMAGE_TINY = {
    **QWEN_IMAGE,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "axes_dims_rope": (8, 4, 4),
}
WAN_TINY = {
    **WAN_1_3B,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "text_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}
HUNYUAN_TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "num_refiner_layers": 1,
    "patch_size": 1,
    "patch_size_t": 1,
    "text_embed_dim": 16,
    "pooled_projection_dim": 8,
    "rope_axes_dim": (4, 6, 6),
}


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, device) -> tuple[float, object]:
    """Wall ms of one ``fn()`` call, the device synchronised before and after; and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def write_json(path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a reader, or a killed run, never sees half a file)."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def ab_args(doc: str, argv=None) -> argparse.Namespace:
    """The options of the kernel A/B scripts: ``--smoke`` (the CPU under the Triton interpreter, a tiny shape;
    sets ``TRITON_INTERPRET``), ``--rep-ms`` and ``--out``. Without ``--smoke`` a CUDA device is required."""
    from pathlib import Path

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU under the Triton interpreter, a tiny shape")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        ap.error("needs a CUDA device (use --smoke on CPU)")
    return args


def window_case(name: str, heads: int, d: int, grid, density: float, smoke: bool):
    """One row's inputs of the refresh A/B scripts: the per-frame window plan at ``grid`` and ``density``
    (:func:`frame_window_plan`), random q, k, v (1, T*H*W, heads, d) (fp16 on the CPU in smoke mode, else bf16
    on the GPU) and the row's description."""
    dev = "cpu" if smoke else "cuda"
    dtype = torch.float16 if smoke else torch.bfloat16
    seq = grid[0] * grid[1] * grid[2]
    plan = frame_window_plan(grid, density, dev)
    g = torch.Generator().manual_seed(seq)
    q, k, v = (torch.randn(1, seq, heads, d, generator=g).to(dev, dtype) for _ in range(3))
    row = {"shape": name, "heads": heads, "head_dim": d, "tokens": seq, "block": plan.block_q,
           "window_density": density, "plan_density": plan.density()}  # fmt: skip
    return plan, (q, k, v), row


def add_row(report: dict, row: dict, out) -> None:
    """Append ``row`` to ``report["rows"]``, print it as one JSON line and rewrite ``out`` (a Path, or None)
    with the whole report, so a run that is cut off keeps the rows it finished."""
    import json

    report["rows"].append(row)
    print(json.dumps(row), flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")


def frame_window_plan(grid, density: float, device):
    """The per-frame window's plan at latent ``grid`` (T, H, W) and ``density``, at the block the window takes
    there: its cap (8 blocks a frame, a power of two), at least 16 and at most 128 tokens."""
    from dit_accel.kernels import BlockPlan
    from dit_accel.methods.window import BLOCKS_PER_FRAME, frame_window_block_mask

    fit = max(grid[1] * grid[2] // BLOCKS_PER_FRAME, 16)
    block = min(1 << (fit.bit_length() - 1), 128)
    mask = frame_window_block_mask(grid, block, block, density)[None, None]
    return BlockPlan.from_block_mask(mask, block, block).to(device)
