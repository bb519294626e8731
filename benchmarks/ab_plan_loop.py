"""A/B of source variants of the sparse kernel's key-block loop (``triton_common.plan_loop``) and its tile
list, at real shapes, in one process on one GPU.

Each variant is the current ``kernels/triton_attention.py`` + ``kernels/triton_common.py`` with textual
substitutions, imported as its own package (own autotuner, own launch cache), and launched on the same random
block plans (``bench_kernels.make_mask``); every output is compared with the current kernel's (max abs
difference), then each variant is timed in interleaved rounds of ``triton.testing.do_bench`` (``--rounds``,
3 by default; the median round is kept) and its effective TF/s (computed blocks only) is divided by cuDNN's
dense TF/s. Each row records the tile each variant's autotuner chose.

Variants (``--variants``; a substitution whose source text is no longer there fails loudly):
    current        the kernel as it is
    search_chain   the masked-suffix search as a binary search in every row (MAX_K_LOG2 + 1 dependent loads
                   before the first tile) instead of one look at the last entry
    eager_rescale  the running maximum and the accumulator rescaled at every tile (no lazy rescaling)
    before         both of the above: the kernel before either change
    old_loop       as before, and the block index loaded in the iteration that uses it (no read-ahead)
    old_tiles      the tile list before the 128x64 4-stage and 64x128 tiles were added
    prefetch2      the index read two iterations ahead
    no_shortcut    full plan rows through the indexed loop instead of the dense loop
    persistent     one program per SM (``--persistent-programs`` per SM) walking (query block, head) tiles in
                   the launch's order; a program's fixed cost (descriptors, Q load, epilogue) stays per tile,
                   the launch and tail of ~24-180 waves of programs go
    more_tiles     the tile list plus 128x64 / 8 warps / 2 stages and 64x64 / 4 warps / 2 stages, small
                   enough in shared memory for two programs per SM (one's prologue and epilogue then
                   overlap the other's key loop)

    source benchmarks/gpu_env.sh && python3 benchmarks/ab_plan_loop.py --out PATH.json     # about 3 min
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import import_source_variants, interleaved_ms, substitute, versions  # noqa: E402
from bench_kernels import computed_pairs, make_mask, tflops  # noqa: E402

ROOT = Path(__file__).parents[1]
CUR_LOOP = """        kb_next = tl.load(idx_base, mask=count > 0, other=0)
        n_full = unmasked_entries(idx_base, stride_ik, count, kv_limit, ANY_LIMIT, PLAN_BK, MAX_K_LOG2)
        n_unmasked = n_full * SUB
        for t in range(0, n_unmasked):
            kb = kb_next
            kb_next = tl.load(idx_base + ((t + 1) // SUB) * stride_ik, mask=t + 1 < n_unmasked, other=0)"""
# Before unmasked_entries: the binary search ran for every row, MAX_K_LOG2 + 1 dependent loads.
SEARCH_LOOP = """\
        n_full = first_masked_entry(idx_base, stride_ik, count, kv_limit, PLAN_BK, MAX_K_LOG2)
        n_unmasked = n_full * SUB
        kb_next = tl.load(idx_base, mask=n_unmasked > 0, other=0)
        for t in range(0, n_unmasked):
            kb = kb_next
            kb_next = tl.load(idx_base + ((t + 1) // SUB) * stride_ik, mask=t + 1 < n_unmasked, other=0)"""
OLD_LOOP = """        n_full = first_masked_entry(idx_base, stride_ik, count, kv_limit, PLAN_BK, MAX_K_LOG2)
        n_unmasked = n_full * SUB
        for t in range(0, n_unmasked):
            kb = tl.load(idx_base + (t // SUB) * stride_ik)"""
PREFETCH2_LOOP = """        kb_next = tl.load(idx_base, mask=count > 0, other=0)
        n_full = unmasked_entries(idx_base, stride_ik, count, kv_limit, ANY_LIMIT, PLAN_BK, MAX_K_LOG2)
        n_unmasked = n_full * SUB
        kb_next2 = tl.load(idx_base + (1 // SUB) * stride_ik, mask=1 < n_unmasked, other=0)
        for t in range(0, n_unmasked):
            kb = kb_next
            kb_next = kb_next2
            kb_next2 = tl.load(idx_base + ((t + 2) // SUB) * stride_ik, mask=t + 2 < n_unmasked, other=0)"""
# Before lazy rescaling: the running maximum moved with every tile and the accumulator was always rescaled.
CUR_RESCALE = "        m_ij = tl.where(m_tile > m_i + RESCALE_TAU, m_tile, m_i)"
EAGER_MAX = "        m_ij = tl.maximum(m_i, m_tile)"
CUR_BRANCH = "    elif tl.min(alpha, 0) < 1.0:"
EAGER_BRANCH = "    else:"
EAGER_RESCALE = [(CUR_RESCALE, EAGER_MAX), (CUR_BRANCH, EAGER_BRANCH)]
CUR_TILES = "(*_TILES, *_LOW_DENSITY_TILES)"
OLD_TILES = "_TILES"
SHORTCUT = "    if count == tl.cdiv(seq_k, PLAN_BK):"
CUR_LOW_TILES = "_LOW_DENSITY_TILES = ((128, 64, 8, 4), (64, 128, 4, 3), (64, 128, 4, 4))"
MORE_LOW_TILES = CUR_LOW_TILES[:-1] + ", (128, 64, 8, 2), (64, 64, 4, 2))"
# Persistent launch (triton_attention.py): the kernel body runs in a loop over tiles; the grid is capped.
BODY_START = "    pid_m = tl.program_id(0)\n    pid_bh = tl.program_id(1)\n    b = pid_bh // H\n"
BODY_END = "        tl.store(LSE + row_ptrs, lse, mask=offs_m < SEQ_Q)\n"
EVEN_D_LINE = "    EVEN_D: tl.constexpr = HEAD_DIM == HEAD_DIM_PAD\n"
PERSISTENT_ATTENTION = [
    ("    rho_add,\n    SEQ_BUCKET,\n", "    rho_add,\n    N_BH,\n    SEQ_BUCKET,\n"),
    (
        "        0.0 if rho_dev else float(rho_add),\n        SEQ_BUCKET=",
        "        0.0 if rho_dev else float(rho_add),\n        batch * heads,\n        SEQ_BUCKET=",
    ),
    (
        '        return (cdiv(seq_q, meta["BLOCK_M"]), batch * heads)',
        '        return (min(_programs(q.device), cdiv(seq_q, meta["BLOCK_M"]) * batch * heads), 1)',
    ),
    (
        "def sparse_attention_fwd(",
        "PROGRAMS_PER_SM = 1\n\n\ndef _programs(device):\n"
        "    if device.type != 'cuda':\n"
        "        return 3  # the interpreter: a few programs, several tiles each\n"
        "    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count\n\n\n"
        "def sparse_attention_fwd(",
    ),
]


def persistent_body(src: str) -> str:
    """The attention kernel's body inside a loop over (query block, head) tiles, query blocks fastest (the
    order the 2-D grid launches them in)."""
    start, end = src.index(BODY_START), src.index(BODY_END) + len(BODY_END)
    body = src[start:end].replace(BODY_START, "    b = pid_bh // H\n").replace(EVEN_D_LINE, "")
    loop = (
        EVEN_D_LINE
        + "    n_m = tl.cdiv(SEQ_Q, BLOCK_M)\n"
        + "    for tile in range(tl.program_id(0), n_m * N_BH, tl.num_programs(0)):\n"
        + "        pid_m = tile % n_m\n        pid_bh = tile // n_m\n"
        + "".join("    " + line if line.strip() else line for line in body.splitlines(keepends=True))
    )
    return src[:start] + loop + src[end:]


VARIANTS = {
    "current": [],
    "search_chain": [(CUR_LOOP, SEARCH_LOOP)],
    "eager_rescale": EAGER_RESCALE,
    "before": [(CUR_LOOP, SEARCH_LOOP), *EAGER_RESCALE],
    "old_loop": [(CUR_LOOP, OLD_LOOP), *EAGER_RESCALE],
    "old_tiles": [(CUR_TILES, OLD_TILES)],
    "prefetch2": [(CUR_LOOP, PREFETCH2_LOOP)],
    "no_shortcut": [(SHORTCUT, "    if count == -1:")],
    "persistent": [],
    "more_tiles": [(CUR_LOW_TILES, MORE_LOW_TILES)],
}
# Variants that change triton_attention.py: substitutions, then an optional whole-source transform.
ATTENTION_VARIANTS = {"persistent": (PERSISTENT_ATTENTION, persistent_body)}
SHAPES = {  # name: (H, S, D, densities); B = 1
    "wan14b_720p_81f": (40, 75600, 128, (0.5, 0.25, 0.1, 0.05, 1.0)),
    "wan1.3b_480p_81f": (12, 32760, 128, (0.5, 0.25, 0.1, 0.05, 1.0)),
    "flux_1024": (24, 4608, 128, (0.5, 0.1, 1.0)),
    "pixart_2k": (16, 16384, 72, (0.5, 0.25, 0.1, 1.0)),
    "d80_9k": (16, 9216, 80, (0.5, 0.1, 1.0)),  # head dim 80, padded to 128 in the kernel
}


def build_variants(names: list[str], where: Path) -> dict:
    """name -> the variant's ``triton_attention`` module."""
    attention = (ROOT / "kernels" / "triton_attention.py").read_text()
    common = (ROOT / "kernels" / "triton_common.py").read_text()
    sources = {}
    for name in names:
        pairs, transform = ATTENTION_VARIANTS.get(name, ([], None))
        attn = substitute(attention, pairs, name)
        sources[name] = {
            "triton_attention.py": transform(attn) if transform else attn,
            "triton_common.py": substitute(common, VARIANTS[name], name),
        }
    return import_source_variants(sources, "triton_attention", where)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="current,search_chain,eager_rescale,before")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median kept)")
    ap.add_argument("--persistent-programs", type=int, default=1, help="programs per SM of `persistent`")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    mods = build_variants(["current", *[n for n in names if n != "current"]], Path(tempfile.mkdtemp()))
    if "persistent" in mods:
        mods["persistent"].PROGRAMS_PER_SM = args.persistent_programs
    report = {"benchmark": "ab_plan_loop", "device": torch.cuda.get_device_name(), "versions": versions()}
    report["rows"] = rows = []

    def save():
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    for shape in args.shapes.split(","):
        run_shape(shape, mods, rows, args.rounds, save)
        torch.cuda.empty_cache()
    return report


def run_shape(shape: str, mods: dict, rows: list, rounds: int, save) -> None:
    """Every density of one shape: check each variant against the current kernel, time, append rows."""
    import triton.testing

    heads, seq, d, densities = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, seq, heads, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in "qkv")
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D) views of diffusers' (B, S, H, D)

    def cudnn():
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)

    cu_ms = triton.testing.do_bench(cudnn, warmup=25, rep=200, return_mode="median")
    cu_tf = tflops(seq * seq * heads, 1, d, cu_ms)
    print(f"{shape}: cuDNN {cu_ms:.3f} ms, {cu_tf:.0f} TF/s", flush=True)
    n = math.ceil(seq / 128)
    failed = {}
    for density in densities:
        mask = make_mask("random", heads, n, n, density)
        idx, cnt = _plan(mask)
        fns = {
            name: (lambda m=m: m.sparse_attention_fwd(qh, kh, vh, idx, cnt, 128, 128, d**-0.5, None)[0])
            for name, m in mods.items()
        }
        ref = fns["current"]().float()
        for name in [n for n in fns if n != "current"]:
            try:
                fns[name]()
            except Exception as e:  # a variant that does not compile here: recorded, not timed
                failed.setdefault(name, f"{type(e).__name__}: {str(e)[:300]}")
                print(f"  {name} failed: {failed[name]}", flush=True)
                del fns[name]
        pairs = computed_pairs(mask, seq, 128)
        row = {"shape": shape, "density": pairs / (seq * seq * heads), "cudnn_tflops": cu_tf}
        if failed:
            row["failed"] = dict(failed)
        row["max_abs_diff_vs_current"] = {
            name: float((fn().float() - ref).abs().max()) for name, fn in fns.items()
        }
        for name, ms in interleaved_ms(fns, rep_ms=150, rounds=rounds).items():
            tf = tflops(pairs, 1, d, ms)
            tuned = str(mods[name]._block_sparse_attn_fwd_kernel.best_config)
            row[name] = {"ms": ms, "tflops": tf, "vs_cudnn": tf / cu_tf, "config": tuned}
        rows.append(row)
        print(
            f"  density {row['density']:.3f}: "
            + ", ".join(f"{name} {row[name]['tflops']:.0f} ({row[name]['vs_cudnn']:.2f}x)" for name in fns),
            flush=True,
        )
        save()


def _plan(mask: torch.Tensor):
    from dit_accel.kernels import BlockPlan

    plan = BlockPlan.from_block_mask(mask.cuda(), 128, 128)
    return plan.kv_indices, plan.kv_counts


if __name__ == "__main__":
    main()
