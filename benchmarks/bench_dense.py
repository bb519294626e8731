"""Dense attention backends side by side at the named shapes, with and without the log-sum-exp.

At each named shape of bench_kernels.py (bf16, B=1, q, k, v stored in diffusers' (B, S, H, D) layout):

- ``sdpa_cudnn``: ``F.scaled_dot_product_attention`` under ``sdpa_kernel(CUDNN_ATTENTION)`` (the stock op's
  path on an H200), no LSE;
- ``flex``: FlexAttention, compiled, no mask, no LSE;
- ``dense_attention`` with backend ``cudnn`` (``aten._scaled_dot_product_cudnn_attention``), ``xformers``
  (``xformers.ops.fmha``; the operator it dispatched to is recorded) and ``triton`` (our dense loop, whose
  LSE is always written), each without the LSE (``<backend>``) and with it (``<backend>+lse``).

Correctness first: every path runs once at the full shape and its output (and LSE) on a slice of query
rows (the first 64 and the last 67, so the sequence tail is in it) is compared with the fp32 torch
reference over all keys. A path that fails (output relative error > 2e-2, or LSE off by > 1e-2) or cannot
run is reported with its error and not timed. Then ``triton.testing.do_bench`` medians, ms and TFLOP/s
(4·B·H·S²·D). Each shape also records what ``dense_attention(backend="auto")`` picks with the table in
kernels/ops.py, the measured order of the correct ``dense_attention`` backends (the rows that table
takes), and the software versions. A markdown table for docs/kernels.md is printed at the end.

GPU (one H200, about 4 minutes; xformers and its CUDA 12 runtime from carried wheels, see the report's
``xformers`` entry when it is missing):

    source benchmarks/gpu_env.sh && python3 benchmarks/bench_dense.py --out PATH.json

CPU smoke run of the same code (tiny shapes, fp16, torch reference and the Triton interpreter only):

    python benchmarks/bench_dense.py --smoke --out /tmp/dense_smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import bench, gpu_tag, rel_err, versions
from bench_kernels import CONFIGS

SMOKE_CONFIGS = {"tiny_d64": (1, 2, 49, 64), "tiny_d72": (2, 1, 37, 72), "tiny_d64_kvlen": (1, 2, 49, 64)}
# Shapes whose last keys are padding, passed as kv_len (valid keys) to dense_attention and as a boolean key
# mask to SDPA (``sdpa_mask``: the stock processor's call). HunyuanVideo 720p: 256 text tokens of which
# 64 are valid, so the last 192 keys are masked.
KV_PAD = {"hunyuan_720p_129f_kvlen": 192, "tiny_d64_kvlen": 5}
KV_CONFIGS = {"hunyuan_720p_129f_kvlen": (1, 24, 119056, 128)}
BACKENDS = ("cudnn", "xformers", "triton")
OUT_TOL = 2e-2
LSE_TOL = 1e-2


def tflops(batch: int, heads: int, seq: int, d: int, ms: float) -> float:
    return 4.0 * batch * heads * seq * seq * d / (ms * 1e-3) / 1e12


def check_rows(seq: int) -> torch.Tensor:
    head = torch.arange(min(64, seq))
    tail = torch.arange(max(seq - 67, 0), seq)
    return torch.unique(torch.cat([head, tail]))


def xformers_status() -> dict:
    """Whether xformers imports, its version, and whether FlashAttention-3 is there for it to dispatch to."""
    import importlib.util

    from dit_accel.kernels import xformers_attention as xa

    fmha, error = xa._fmha()
    status = {"available": fmha is not None, "version": xa.version(), "error": error}
    status["flash_attn_3_installed"] = importlib.util.find_spec("flash_attn_3") is not None
    status["extension_error"] = xa._extension_error() if fmha is not None else None
    return status


def run_config(name, batch, heads, seq, d, smoke, rep_ms, log) -> dict:
    import torch.nn.functional as F

    from dit_accel.kernels import dense_attention, ops
    from dit_accel.kernels import xformers_attention as xa
    from dit_accel.kernels.reference import attention_reference

    dev = "cpu" if smoke else "cuda"
    dtype = torch.float16 if smoke else torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D) views, no copies
    scale = d**-0.5
    rows = check_rows(seq).to(dev)
    pad = KV_PAD.get(name, 0)
    kv_len = torch.full((batch,), seq - pad, dtype=torch.int32, device=dev) if pad else None
    ref_out, ref_lse = attention_reference(qh[:, :, rows], kh, vh, None, scale, kv_len)
    res = {"config": name, "B": batch, "H": heads, "S": seq, "D": d, "check_rows": int(rows.numel())}
    if pad:
        res["kv_len"] = seq - pad

    paths = {}
    if not smoke:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.flex_attention import flex_attention

        def sdpa_cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qh, kh, vh), None

        if pad:
            mask = (torch.arange(seq, device=dev) < seq - pad).expand(batch, 1, 1, seq)
            paths["sdpa_mask"] = (
                lambda: (F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask), None),
                False,
            )
        else:
            flex = torch.compile(flex_attention, dynamic=False)
            paths["sdpa_cudnn"] = (sdpa_cudnn, False)
            paths["flex"] = (lambda: (flex(qh, kh, vh), None), False)
    for backend in BACKENDS:
        for lse in (False, True):

            def run(b=backend, lse=lse):
                r = dense_attention(q, k, v, backend=b, return_lse=lse, kv_len=kv_len)
                return (r[0].transpose(1, 2), r[1]) if lse else (r.transpose(1, 2), None)

            paths[backend + ("+lse" if lse else "")] = (run, lse)
    if smoke:
        paths["torch+lse"] = (
            lambda: (lambda r: (r[0].transpose(1, 2), r[1]))(
                dense_attention(q, k, v, backend="torch", kv_len=kv_len)
            ),
            True,
        )

    res["paths"] = {}
    for path, (fn, lse) in paths.items():
        row = {"lse": lse}
        try:
            out, out_lse = fn()
            row["out_err"] = rel_err(out[:, :, rows], ref_out)
            ok = row["out_err"] <= OUT_TOL and bool(torch.isfinite(out[:, :, rows]).all())
            if lse:
                row["lse_err"] = float((out_lse[:, :, rows] - ref_lse).abs().max())
                ok = ok and out_lse.dtype == torch.float32 and row["lse_err"] <= LSE_TOL
            del out, out_lse
            row["correct"] = ok
            if ok:
                row["ms"] = bench(fn, smoke, rep_ms=rep_ms)
                row["tflops"] = tflops(batch, heads, seq, d, row["ms"])
                log(f"  {path:14s} {row['ms']:9.3f} ms {row['tflops']:6.1f} TF/s  err {row['out_err']:.1e}")
            else:
                log(f"  {path:14s} FAILED CHECK {row}")
        except Exception as exc:  # noqa: BLE001 - a path that cannot run is recorded, the others go on
            row["correct"] = False
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            log(f"  {path:14s} cannot run: {row['error'][:200]}")
        res["paths"][path] = row

    res["xformers_op"] = {}
    res["auto"], res["measured_order"], res["table_key"] = {}, {}, {}
    major = torch.cuda.get_device_capability()[0] if not smoke else 0
    for lse in (False, True):
        tag = "lse" if lse else "no_lse"
        res["xformers_op"][tag] = xa.fw_op_name(qh, kh, vh, scale, lse) if xa._fmha()[0] else None
        res["auto"][tag] = ops._pick_dense("auto", qh, kh, vh, kv_len, scale, lse)
        timed = [
            (res["paths"][b + ("+lse" if lse else "")].get("ms"), b)
            for b in BACKENDS
            if res["paths"][b + ("+lse" if lse else "")].get("ms") is not None
        ]
        res["measured_order"][tag] = [b for _, b in sorted(timed)]
        res["table_key"][tag] = list(ops._dense_table_key(major, d, seq, lse, bool(pad)))
    log(f"  auto {res['auto']}; measured {res['measured_order']}; xformers op {res['xformers_op']}")
    return res


def markdown(report: dict) -> str:
    """The dense table of docs/kernels.md: ms (TF/s) per path, '-' where a path failed or could not run."""
    cols = ["sdpa_cudnn", "sdpa_mask", "cudnn", "cudnn+lse", "xformers", "xformers+lse", "triton+lse", "flex"]
    lines = [
        "| config | B,H,S,D | " + " | ".join(cols) + " | auto (no LSE / LSE) |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    for c in report["configs"]:
        cells = []
        for col in cols:
            row = c["paths"].get(col, {})
            cells.append(f"{row['ms']:.2f} ({row['tflops']:.0f})" if "ms" in row else "-")
        lines.append(
            f"| {c['config']} | {c['B']},{c['H']},{c['S']},{c['D']} | "
            + " | ".join(cells)
            + f" | {c['auto']['no_lse']} / {c['auto']['lse']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the code paths)")
    ap.add_argument("--configs", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument(
        "--budget-s", type=float, default=330.0, help="start no new shape after this many seconds"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    args = ap.parse_args(argv)
    smoke = args.smoke
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        ap.error("needs a CUDA device (use --smoke on CPU)")
    table = SMOKE_CONFIGS if smoke else {**CONFIGS, **KV_CONFIGS}
    names = args.configs.split(",") if args.configs else list(table)
    results = Path(tempfile.gettempdir()) if smoke else Path(__file__).parent / "results"
    out_path = args.out or results / f"dense_{'smoke' if smoke else gpu_tag()}.json"

    report = {
        "benchmark": "bench_dense",
        "device": torch.cuda.get_device_name() if not smoke else platform.processor() or "cpu",
        "capability": list(torch.cuda.get_device_capability()) if not smoke else None,
        "versions": {**versions(), "cudnn": torch.backends.cudnn.version()},
        "xformers": xformers_status(),
        "dtype": "float16" if smoke else "bfloat16",
        "timing": "perf_counter median of 3" if smoke else "triton.testing.do_bench median, ms",
        "tolerances": {"out_rel_err": OUT_TOL, "lse_abs_err": LSE_TOL},
        "configs": [],
        "skipped": [],
    }
    report["versions"]["xformers"] = report["xformers"]["version"]
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1) + "\n")

    log(f"{report['device']}; xformers: {report['xformers']}")
    for name in names:
        if time.time() - t0 > args.budget_s:
            report["skipped"].append(name)
            log(f"{name}: skipped, past the {args.budget_s:.0f} s budget")
            continue
        b, h, s, d = table[name]
        log(f"{name}: B={b} H={h} S={s} D={d}")
        report["configs"].append(run_config(name, b, h, s, d, smoke, args.rep_ms, log))
        save()
        if not smoke:
            torch.cuda.empty_cache()
    print(markdown(report))
    log(f"wrote {out_path}")
    if any(not r["correct"] and "error" not in r for c in report["configs"] for r in c["paths"].values()):
        print("a path failed its correctness check: it was not timed", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
