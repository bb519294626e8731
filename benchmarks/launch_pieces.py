"""Host microseconds of each piece of one attention call at the embedded model's GPU shape (1, 2,496, 6, 64;
bf16; a random plan of 64-token blocks at density ~0.5): cuDNN SDPA, ``block_sparse_attention`` through the
call cache and without it, the cache's own pieces (key, output allocation, replay), ``rotary_interleaved``
cached and not, then the layers and checks of the uncached path down to the compiled kernel's C launcher and
Triton's scratch allocator. Each line: 200 calls without synchronisation, per call, median of 7 rounds.

    source benchmarks/gpu_env.sh && python3 benchmarks/launch_pieces.py --out PATH.json    # ~30 s, CUDA
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device: it times Triton launches")
    import triton
    import triton.runtime._allocation as allocation

    from dit_accel.kernels import BlockPlan, ops
    from dit_accel.kernels import triton_attention as ta
    from dit_accel.kernels import triton_common as tc

    dev = torch.device("cuda")
    b, s, h, d = 1, 2496, 6, 64
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    nb = -(-s // 64)
    mask = torch.rand(1, 1, nb, nb, device=dev) < 0.5
    mask |= torch.eye(nb, dtype=torch.bool, device=dev)
    plan = BlockPlan.from_block_mask(mask, 64, 64)
    out: dict = {}

    def t(name, fn, n=200, rounds=7):
        fn()
        torch.cuda.synchronize()
        xs = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            xs.append((time.perf_counter() - t0) / n * 1e6)
            torch.cuda.synchronize()
        out[name] = round(statistics.median(xs), 2)
        print(f"{name:40s} {out[name]:8.2f} us", flush=True)

    def uncached(name, fn):
        ops._CALL_CACHE = False
        try:
            t(name, fn)
        finally:
            ops._CALL_CACHE = True

    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    sparse = lambda: ops.block_sparse_attention(q, k, v, plan)  # noqa: E731
    t("sdpa (bhsd views)", lambda: F.scaled_dot_product_attention(qh, kh, vh))
    t("block_sparse_attention (call cache)", sparse)
    uncached("block_sparse_attention uncached", sparse)
    key_args = (q, k, v, plan, None, None, "bshd", "auto", None, 0.0, True)
    t("_sparse_call_key", lambda: ops._sparse_call_key(*key_args))
    hit = ops._CALLS[ops._sparse_call_key(*key_args)]
    t(
        "empty_strided out",
        lambda: torch.empty_strided(hit.out_shape, hit.out_stride, dtype=q.dtype, device=dev),
    )
    roles = hit._roles(q, k, v, torch.empty_like(q), torch.empty(b, h, s, device=dev), plan, None, 0.0)
    t("Replay alone", lambda: hit.replay(roles))
    idx, cnt = plan.kv_indices, plan.kv_counts
    t("_sparse_attention_impl", lambda: ops._sparse_attention_impl(qh, kh, vh, idx, cnt, 64, 64, 0.125, None))
    t("sparse_attention_fwd", lambda: ta.sparse_attention_fwd(qh, kh, vh, idx, cnt, 64, 64, 0.125, None))
    cos, sin = torch.randn(1, s, 1, d, device=dev), torch.randn(1, s, 1, d, device=dev)
    rotary = lambda: ops.rotary_interleaved(q, k, cos, sin)  # noqa: E731
    t("rotary_interleaved (call cache)", rotary)
    uncached("rotary_interleaved uncached", rotary)
    # the checks of the uncached path
    t("_check_inputs", lambda: ops._check_inputs(q, k, v, "bshd", None, None))
    t("_check_plan", lambda: ops._check_plan(plan, qh, kh))
    t("_needs_grad", lambda: ops._needs_grad(qh, kh, vh))
    t("_pick", lambda: ops._pick("auto", qh, "x", (64, 64), False))
    t("_plain_eager", lambda: ops._plain_eager(qh, kh, vh, idx, cnt))
    # the launcher's pieces before the launch
    t("empty_like(q)", lambda: torch.empty_like(qh))
    t("empty lse", lambda: torch.empty(b, h, s, dtype=torch.float32, device=dev))
    t("plan_args", lambda: tc.plan_args(idx, cnt, dev))
    t("tma_ok(k, v)", lambda: tc.tma_ok(kh, vh))
    t("strides x4", lambda: (qh.stride()[:3], kh.stride()[:3], vh.stride()[:3], qh.stride()[:3]))
    # the launch: capture one direct launch's key and arguments
    seen = {}
    direct = tc._direct_launch

    def spy(key, grid, device, launch_args):
        seen.update(key=key, grid=grid, device=device, args=launch_args)
        return direct(key, grid, device, launch_args)

    tc._direct_launch = spy
    for _ in range(2):
        ta.sparse_attention_fwd(qh, kh, vh, idx, cnt, 64, 64, 0.125, None)
    tc._direct_launch = direct
    if not seen:
        out["note"] = f"direct launches are off (triton {triton.__version__}): launch pieces not timed"
    else:
        key, grid, device, launch_args = seen["key"], seen["grid"], seen["device"], seen["args"]
        compiled, tail = tc._COMPILED[key]
        kernel = ta._block_sparse_attn_fwd_kernel
        t("_exact_key", lambda: tc._exact_key(kernel, key[1], grid, device, launch_args, {}))
        t("hash(exact key)", lambda: hash(key))
        t("_launch_hooks_set", tc._launch_hooks_set)
        t("get_current_device", triton.runtime.driver.active.get_current_device)
        t("get_current_stream", lambda: triton.runtime.driver.active.get_current_stream(device))
        t("knobs.runtime.debug", lambda: triton.knobs.runtime.debug)
        stream = triton.runtime.driver.active.get_current_stream(device)
        t(
            "compiled.run (C launcher)",
            lambda: compiled.run(
                grid[0],
                grid[1],
                grid[2],
                stream,
                compiled.function,
                compiled.packed_metadata,
                None,
                None,
                None,
                *launch_args,
                *tail,
            ),  # fmt: skip
        )
        t("_direct_launch", lambda: tc._direct_launch(key, grid, device, launch_args))
        alloc = allocation._allocator.get()
        t("allocator(1024)", lambda: alloc(1024, 128, None))
        t("torch.empty int8 cuda str", lambda: torch.empty(1024, dtype=torch.int8, device="cuda"))
        t("torch.empty int8 device obj", lambda: torch.empty(1024, dtype=torch.int8, device=dev))
    out["device"] = torch.cuda.get_device_name()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
