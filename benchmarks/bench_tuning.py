"""How well each tuner picks the sparse kernel's tile: fresh processes tune a first launch, the parent times
every tile.

A tuning key's tile is picked once, at its first launch in a process (``DIT_ACCEL_TUNER``: Triton's
autotuner, which times the candidates one after another, or ``interleaved``, rounds of every candidate). A
wrong pick costs every later call of the run. This script measures how often each tuner picks well:

- each trial is a fresh Python process (Triton's tuning state starts empty, as in a new run) that builds the
  same q, k, v and plan, optionally keeps the GPU busy with matrix products for ``--preheat-ms`` first (as
  the layers before a model's first attention do), then launches the sparse kernel once and reports its pick,
  the tuning record and the first launch's wall time;
- trials run in rounds over (tuner, preheat), so a slow stretch of the machine hits each alike;
- the parent times every candidate tile on the same inputs, interleaved (``_common.interleaved_ms``), and
  scores each pick by its regret: the pick's time over the fastest tile's.

    source benchmarks/gpu_env.sh && python3 benchmarks/bench_tuning.py --config wan14b_720p_81f \\
        --density 0.1 --trials 4 --out PATH.json          # about 2 min (H200)

``--smoke``: the same code on the CPU (a tiny shape, Triton's interpreter, one candidate tile):
``tests/test_bench_tuning.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench, interleaved_ms, versions, write_json  # noqa: E402
from bench_kernels import CONFIGS, make_mask  # noqa: E402

TUNERS = ("triton", "interleaved")
SMOKE_SHAPE = (1, 2, 70, 32)  # B, H, S, D
BLOCK = 128
SMOKE_BLOCK = 16


def inputs(config: str, density: float, smoke: bool):
    """The seeded q, k, v (B, S, H, D) and block plan every process builds alike."""
    from dit_accel.kernels import BlockPlan

    batch, heads, seq, d = SMOKE_SHAPE if smoke else CONFIGS[config]
    block = SMOKE_BLOCK if smoke else BLOCK
    dev, dtype = ("cpu", torch.float16) if smoke else ("cuda", torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
    n = math.ceil(seq / block)
    plan = BlockPlan.from_block_mask(make_mask("random", heads, n, n, density).to(dev), block, block)
    return q, k, v, plan


def _attention_key():
    """The attention kernel's tuning key of this process's (single) tuning."""
    from dit_accel.kernels import triton_attention, triton_common

    kernel = triton_attention._block_sparse_attn_fwd_kernel
    (key,) = [k for k in triton_common._TUNED if k[0] is kernel]
    return key


def preheat(ms: float, smoke: bool) -> None:
    """Keep the GPU busy with bf16 matrix products for about ``ms`` milliseconds."""
    if ms <= 0 or smoke:
        return
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < ms:
        for _ in range(10):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def child(args) -> dict:
    """One trial: tune the first launch in this fresh process."""
    from dit_accel.kernels import block_sparse_attention, triton_common

    q, k, v, plan = inputs(args.config, args.density, args.smoke)
    preheat(args.preheat_ms, args.smoke)
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    block_sparse_attention(q, k, v, plan, backend="triton")
    sync()
    first_ms = (time.perf_counter() - t0) * 1e3
    (pick,) = triton_common.tuned_configs()
    return {"pick": pick["config"], "tuning": pick["tuning"], "first_launch_ms": first_ms}


def run_child(args, tuner: str, preheat_ms: float) -> dict:
    cmd = [sys.executable, __file__, "--child", "--config", args.config, "--density", str(args.density),
           "--preheat-ms", str(preheat_ms)] + (["--smoke"] if args.smoke else [])  # fmt: skip
    env = {**os.environ, "DIT_ACCEL_TUNER": tuner}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"tuner": tuner, "preheat_ms": preheat_ms, "error": done.stderr[-2000:]}
    return {"tuner": tuner, "preheat_ms": preheat_ms, **json.loads(done.stdout.strip().splitlines()[-1])}


def time_tiles(q, k, v, plan, smoke: bool, rep_ms: int) -> dict[str, float | str]:
    """Median ms of the attention kernel on these inputs under every candidate tile, interleaved."""
    from dit_accel.kernels import block_sparse_attention, triton_attention, triton_common

    triton_common._TUNED.clear()  # this process's only tuning: the key below is this launch's
    block_sparse_attention(q, k, v, plan, backend="triton")  # tunes (and records the key)
    key = _attention_key()
    kernel = triton_attention._block_sparse_attn_fwd_kernel
    names = kernel.keys
    kwargs = dict(zip(names, key[1 : 1 + len(names)]))
    tiles = triton_common.prune_configs(triton_common.attention_configs(), None, **kwargs)
    saved = triton_common._TUNED[key]
    fns, out = {}, {}

    def forced(cfg):
        def fn():
            triton_common._TUNED[key] = (cfg, cfg.all_kwargs())
            return block_sparse_attention(q, k, v, plan, backend="triton")

        return fn

    try:
        for cfg in tiles:
            try:
                forced(cfg)()
                fns[str(cfg)] = forced(cfg)
            except Exception as e:  # noqa: BLE001 - a tile that does not fit is skipped, as the tuners do
                out[str(cfg)] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if smoke:
            out.update({name: bench(fn, smoke=True) for name, fn in fns.items()})
        else:
            out.update(interleaved_ms(fns, rep_ms=rep_ms))
    finally:
        triton_common._TUNED[key] = saved
    return out


def summarise(trials: list[dict], tiles: dict) -> dict:
    """Per (tuner, preheat): picks, regret (pick's ms over the best tile's), tuning seconds."""
    times = {name: ms for name, ms in tiles.items() if isinstance(ms, float)}
    best = min(times.values())
    out = {}
    for t in trials:
        if "error" in t:
            continue
        t["regret"] = times[t["pick"]] / best if t["pick"] in times else None
        row = out.setdefault(f"{t['tuner']} preheat {t['preheat_ms']:g} ms", {"picks": {}, "regret": []})
        row["picks"][t["pick"]] = row["picks"].get(t["pick"], 0) + 1
        row["regret"].append(t["regret"])
        row.setdefault("tuning_s", []).append(t["tuning"]["seconds"])
    for row in out.values():
        regrets = [r for r in row["regret"] if r is not None]
        row["regret_mean"] = statistics.fmean(regrets) if regrets else None
        row["regret_max"] = max(regrets) if regrets else None
        row["tuning_s_median"] = statistics.median(row["tuning_s"])
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="wan14b_720p_81f", choices=sorted(CONFIGS))
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--trials", type=int, default=4, help="fresh processes per (tuner, preheat)")
    parser.add_argument("--preheat", default="0,1000", help="comma-separated ms of GPU work first")
    parser.add_argument("--tuners", default=",".join(TUNERS))
    parser.add_argument("--rep-ms", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shape")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preheat-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    tuners = [t.strip() for t in args.tuners.split(",")]
    if unknown := set(tuners) - set(TUNERS):
        parser.error(f"--tuners: unknown {sorted(unknown)}; choose from {TUNERS}")
    preheats = [float(p) for p in args.preheat.split(",")]
    trials = []
    for trial in range(args.trials):
        for preheat_ms in preheats:
            for tuner in tuners:
                trials.append(run_child(args, tuner, preheat_ms))
                r = trials[-1]
                print(f"trial {trial} {tuner:11s} preheat {preheat_ms:6g} ms: "
                      f"{r.get('pick', r.get('error', '')[-300:])}", flush=True)  # fmt: skip
    q, k, v, plan = inputs(args.config, args.density, args.smoke)
    tiles = time_tiles(q, k, v, plan, args.smoke, args.rep_ms)
    report = {
        "config": "smoke" if args.smoke else args.config,
        "density": plan.density(),
        "device": torch.cuda.get_device_name() if q.is_cuda else "cpu",
        "versions": versions(),
        "tiles_ms": tiles,
        "summary": summarise(trials, tiles),
        "trials": trials,
    }
    for name, row in report["summary"].items():
        print(f"{name}: picks {row['picks']}, regret mean {row['regret_mean']}, max {row['regret_max']}, "
              f"tuning {row['tuning_s_median']} s")  # fmt: skip
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
