"""A/B of source variants of the block-mass kernel (``kernels/triton_mass.py``) at real shapes, in one process
on one GPU: what the cached search of adaspa costs against one cuDNN attention.

Each variant is ``kernels/triton_mass.py`` (with ``kernels/triton_common.py``) with textual substitutions,
imported as its own package (own autotuner, own launch cache); ``before`` is another version of the file
(``--before PATH``, e.g. ``git show <rev>:kernels/triton_mass.py > before.py``). Variants combine with
``+`` (``before+all_tiles``: that file with the tile list substituted). Every variant runs on the
same q, k and fresh LSE (from ``dense_attention``): its W is compared with the first variant's (largest
relative difference over blocks holding at least 1e-3 of a row's mass) and its rows must sum to their
block's row count (the mass of a fresh LSE is 1 per row). Then each variant is timed in three interleaved
rounds of ``triton.testing.do_bench`` (the middle one kept), against cuDNN SDPA's dense attention; the tile
the variant's autotuner picked is recorded.

Variants (``--variants``; a substitution whose source text is no longer there fails loudly):
    before         the file given by --before
    current        the kernel as it is
    chunk1         the row sums reduced across warps at every key block
    chunk8/chunk32 8 / 32 key blocks per cross-warp reduction
    all_tiles      twelve tiles in the autotuner (the kernel's list and seven more)

    source benchmarks/gpu_env.sh && python3 benchmarks/ab_block_mass.py --before B.py --out X.json  # ~3 min
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import import_source_variants, interleaved_ms, substitute, versions  # noqa: E402

ROOT = Path(__file__).parents[1]
CHUNK = "CHUNK = 16\n"
# `_configs` of any version of the file, and the one of all_tiles (twelve tiles).
CONFIGS_FN = re.compile(r"\ndef _configs\(\):\n.*?\n\n\n", re.DOTALL)
ALL_TILES = """
def _configs():
    return [cfg(*c) for c in [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 4, 3),
            (128, 64, 8, 4), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 4), (64, 128, 4, 4),
            (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 4, 4)]]


"""
VARIANTS = {
    "current": [],
    "chunk1": [(CHUNK, "CHUNK = 1\n")],
    "chunk8": [(CHUNK, "CHUNK = 8\n")],
    "chunk32": [(CHUNK, "CHUNK = 32\n")],
    "all_tiles": "tiles",
}
SHAPES = {  # name: (H, S, D); B = 1, 128x128 plan blocks
    "wan1.3b_480p_81f": (12, 32760, 128),
    "wan14b_720p_81f": (40, 75600, 128),
    "cogvideox5b_49f": (48, 17776, 64),
    "flux_1024": (24, 4608, 128),
}
BLOCK = 128


def build_variants(names: list[str], before: Path | None, where: Path) -> dict:
    """name -> the variant's ``triton_mass`` module."""
    mass = (ROOT / "kernels" / "triton_mass.py").read_text()
    common = (ROOT / "kernels" / "triton_common.py").read_text()
    sources = {}
    for name in names:
        parts = name.split("+")
        text = before.read_text() if parts[0] == "before" else mass
        for part in parts:
            if part == "before":
                continue
            if VARIANTS[part] == "tiles":
                text, n = CONFIGS_FN.subn(lambda _: ALL_TILES, text)
                if n != 1:
                    raise SystemExit(f"variant {name}: no _configs() found in the source")
            else:
                text = substitute(text, VARIANTS[part], name)
        sources[name.replace("+", "_")] = {"triton_mass.py": text, "triton_common.py": common}
    mods = import_source_variants(sources, "triton_mass", where)
    return {name: mods[name.replace("+", "_")] for name in names}


def run_shape(shape: str, mods: dict, rows: list, save) -> None:
    import triton.testing

    from dit_accel.kernels import dense_attention

    heads, seq, d = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, seq, heads, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "qkv")
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D) views of diffusers' (B, S, H, D)
    _, lse = dense_attention(q, k, v)
    scale = d**-0.5

    cu_ms = triton.testing.do_bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh), warmup=25, rep=200
    )
    print(f"{shape}: cuDNN {cu_ms:.3f} ms", flush=True)
    fns = {
        name: (lambda m=m: m.block_mass_fwd(qh, kh, lse, BLOCK, BLOCK, scale, None))
        for name, m in mods.items()
    }
    row = {"shape": shape, "heads": heads, "seq": seq, "head_dim": d, "cudnn_ms": cu_ms, "variants": {}}
    rows_per_block = torch.full((-(-seq // BLOCK),), float(BLOCK), device="cuda")
    rows_per_block[-1] = seq - BLOCK * (rows_per_block.numel() - 1)
    first = None
    for name, fn in fns.items():
        w = fn()
        first = w if first is None else first
        big = first > 1e-3
        row["variants"][name] = {
            "max_rel_diff_vs_first": float(((w - first).abs() / first.clamp_min(1e-3))[big].max()),
            "max_row_sum_err": float((w.sum(-1) - rows_per_block).abs().max()),
        }
    for name, ms in interleaved_ms(fns, rep_ms=200).items():
        best = mods[name]._block_mass_kernel.best_config
        tile = [best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages]
        row["variants"][name].update(ms=ms, vs_cudnn=ms / cu_ms, tile=tile)
    rows.append(row)
    print(
        "  "
        + ", ".join(
            f"{n} {v['ms']:.2f} ms ({v['vs_cudnn']:.2f}x, {v['tile']})" for n, v in row["variants"].items()
        ),
        flush=True,
    )
    save()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--variants", default="before,before+all_tiles,current,current+all_tiles,chunk32+all_tiles"
    )
    ap.add_argument("--before", type=Path, help="another kernels/triton_mass.py (variant 'before')")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    names = args.variants.split(",")
    unknown = sorted({part for n in names for part in n.split("+")} - set(VARIANTS) - {"before"})
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: before, {', '.join(VARIANTS)}")
    if any(n.split("+")[0] == "before" for n in names) and args.before is None:
        ap.error("--variants: 'before' needs --before PATH")
    mods = build_variants(names, args.before, Path(tempfile.mkdtemp()))
    report = {"benchmark": "ab_block_mass", "device": torch.cuda.get_device_name(), "versions": versions()}
    report["rows"] = rows = []
    for shape in args.shapes.split(","):
        run_shape(shape, mods, rows, lambda: args.out.write_text(json.dumps(report, indent=1) + "\n"))
        torch.cuda.empty_cache()
    return report


if __name__ == "__main__":
    main()
