"""Context parallelism: dit_accel's methods under diffusers' Ulysses attention, on 1 GPU and on N GPUs.

One launch per machine measures both: every rank builds the same model (random weights from the real config,
bf16, rank 0's weights broadcast), runs each row on its own GPU (the 1-GPU numbers, rank 0's), then enables
``ContextParallelConfig(ulysses_degree=N)`` on it and runs each row again over all N GPUs. Rows (from
bench_e2e's table): ``stock`` (diffusers' attention; its own Ulysses attention under CP), ``dense``
(dit_accel's processors, every call dense), and the methods.

Per row and GPU count:

1. **Schedule**: the row's kind of every (context, step) of a ``--steps``-step run, probed on a tiny CPU model
   (``bench_e2e.probe_schedule``).
2. **One forward per kind**: the first step of each kind is visited in step order through
   ``cache_context("cond", step_index=i, num_inference_steps=n)``, as WanPipeline drives the tracker
   (``--warmup`` untimed calls, then the median of ``--repeats`` timed ones; the device is synchronised per
   call). The kind each visit ran (from ``handle.stats(all_ranks=True)`` under CP) must equal the probed one.
   A method's dense steps run the stock op through dit_accel's processors: they take the ``dense`` row's time
   on the same GPU count (``--no-share-dense`` visits them per row).
3. **Estimate**: the sum over contexts and steps of the time of each step's kind (Wan: two calls per step,
   cond and uncond).
4. **Check**: the N-GPU output of every visited step against the 1-GPU output of the same row and step
   (relative L2 error, ``--tol``, bf16) and the same stats kinds; a row that fails reports no speedup.

Speedups per row: ``cp`` (its 1-GPU estimate over its N-GPU one), ``vs_stock_1gpu`` and ``vs_stock_cp``
(the stock row's estimate on 1 / N GPUs over this row's on N). Results: ``--out`` (default
``benchmarks/results/parallel_<geometry>_<gpu>_x<N>.json``), written after every row.

GPU (after ``source benchmarks/gpu_env.sh``; N = the machine's GPUs, 2, 4 or 8):

    torchrun --standalone --nproc_per_node N benchmarks/bench_parallel.py

About 8 minutes on 2 H200s with the default rows (most of it the 1-GPU pass: 12 visited steps, two calls
each, of 6-12 s); ``--rows`` splits a run (each launch writes its own ``--out``).

CPU smoke run of the same code (two processes over gloo, the tiny Wan, fp32, torch kernels):

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_parallel.py --smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from _common import gpu_tag, rel_err, timed_ms, versions, write_json  # noqa: E402
from bench_e2e import (  # noqa: E402
    GEOMETRIES,
    ROWS,
    Skip,
    build_model,
    classify,
    forward_call,
    install,
    make_inputs,
    probe_schedule,
    row_knobs,
    segments,
    uninstall,
)

# Rows of this benchmark besides bench_e2e's. Under Ulysses each rank holds H/N heads: adaspa's head-adaptive
# tiers rank the heads of one rank (dit_accel.parallel), so only uniform sparsity gives the 1-GPU plans.
EXTRA_ROWS = [
    {
        "name": "adaspa_0.8_uniform",
        "method": "adaspa",
        "sparsity": 0.8,
        "head_adaptive": False,
        "note": "adaspa without head-adaptive tiers: the same plans on 1 and N GPUs",
    },
]
DEFAULT_ROWS = (
    "stock",
    "dense",
    "window_0.1",
    "radial",
    "adaspa_0.8",
    "adaspa_0.8_uniform",
    "rettention_window_0.05",
)


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def visits(kinds: list[str]) -> list[tuple[str, int]]:
    """(kind, step) of the first step of each kind, in step order."""
    out, seen = [], set()
    for kind, start, _ in segments(kinds):
        if kind not in seen:
            seen.add(kind)
            out.append((kind, start))
    return out


def enable_ulysses(model, degree: int, smoke: bool) -> None:
    """``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))``.

    On CPU (smoke), diffusers 0.42 picks the device as ``rank % torch.accelerator.device_count()``, which
    divides by zero without an accelerator: a count of 1 makes it ``cpu:0`` and the rest runs unchanged.
    """
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ulysses_degree=degree)
    if not smoke:
        model.enable_parallelism(config=config)
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        model.enable_parallelism(config=config)
    finally:
        torch.accelerator.device_count = count


class Bench:
    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.name = "smoke" if args.smoke else args.geometry
        self.geom = GEOMETRIES[self.name]
        self.family = self.geom["family"]
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        if self.smoke:
            self.device = torch.device("cpu")
        else:
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.backend = "torch" if self.smoke else args.backend
        self.steps = args.steps or (6 if self.smoke else 50)
        self.contexts = tuple(self.geom["contexts"])
        names = args.rows.split(",") if args.rows else list(DEFAULT_ROWS)
        by_name = {r["name"]: r for r in [*ROWS, *EXTRA_ROWS]}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"--rows: unknown {unknown}; known: {list(by_name)}")
        self.rows = [by_name[n] for n in names]
        tag = "cpu" if self.smoke else gpu_tag()
        default_out = Path(__file__).parent / "results" / f"parallel_{self.name}_{tag}_x{self.world}.json"
        self.out = Path(args.out) if args.out else default_out
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}
        self.started = time.perf_counter()
        _, _, frames, h, w = self.geom["latent"]
        pt, ph, pw = self.geom["config"]["patch_size"]
        grid = (frames // pt, h // ph, w // pw)
        self.result = {
            "benchmark": "bench_parallel",
            "geometry": {
                "name": self.name,
                "family": self.family,
                "latent": list(self.geom["latent"]),
                "grid": list(grid),
                "tokens": math.prod(grid),
                "heads": self.geom["config"]["num_attention_heads"],
                "contexts": list(self.contexts),
            },
            "world_size": self.world,
            "gpu_counts": [1, self.world],
            "parallelism": f"enable_parallelism(ContextParallelConfig(ulysses_degree={self.world}))",
            "steps": self.steps,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": torch.cuda.get_device_name() if not self.smoke else "cpu",
            "versions": versions(),
            "knobs": {
                "warmup": args.warmup,
                "repeats": args.repeats,
                "backend": self.backend,
                "block": self.geom["block"],
                "tol": args.tol,
            },
            "timer": "perf_counter, device synced per call; rank 0's time (all ranks take part under CP)",
            "rows": {},
        }

    def flush(self) -> None:
        self.result["elapsed_s"] = time.perf_counter() - self.started
        if self.rank == 0:
            write_json(self.out, self.result)

    # ---------------------------------------------------------------------------------------------
    def schedules(self) -> dict[str, dict | str]:
        """Per row: its schedule {context: [kind per step]}, or why it is skipped (probed across ranks)."""
        mine: dict[str, dict | str] = {}
        for row in self.rows[self.rank :: self.world]:
            try:
                knobs = row_knobs(row, self.family)
            except Skip as e:
                mine[row["name"]] = str(e)
                continue
            mine[row["name"]] = probe_schedule(self.family, knobs, self.steps, self.contexts)
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return {name: schedule for part in gathered for name, schedule in part.items()}

    def run(self) -> dict:
        schedules = self.schedules()
        log(
            f"[bench_parallel] {self.name}: {len(self.rows)} rows, {self.steps} steps, 1 and {self.world} GPU"
        )
        t0 = time.perf_counter()
        model = build_model(self.family, self.geom["config"], self.device, self.dtype)
        for p in [*model.parameters(), *model.buffers()]:
            dist.broadcast(p.data, src=0)
        inputs = make_inputs(self.geom["family"], self.geom, self.contexts, self.device, self.dtype)
        for kwargs in inputs.values():
            for value in kwargs.values():
                if isinstance(value, torch.Tensor):
                    dist.broadcast(value, src=0)
        self.result["model_build_s"] = time.perf_counter() - t0
        for row in self.rows:
            entry = self.result["rows"].setdefault(row["name"], {"row": row})
            schedule = schedules[row["name"]]
            if isinstance(schedule, str):
                entry["skipped"] = schedule
            else:
                entry["schedule"] = {
                    ctx: "".join(_letter(k) for k in kinds) for ctx, kinds in schedule.items()
                }
                entry["kinds"] = sorted({k for kinds in schedule.values() for k in kinds})
        for gpus in (1, self.world):
            if gpus > 1:
                enable_ulysses(model, gpus, self.smoke)
            for row in self.rows:
                schedule = schedules[row["name"]]
                if isinstance(schedule, str):
                    continue
                self.result["rows"][row["name"]][f"gpus_{gpus}"] = self.run_row(
                    model, inputs, row, schedule, gpus
                )
                self.flush()
                log(f"[bench_parallel] {row['name']} on {gpus} GPU(s): {self._line(row['name'], gpus)}")
        self.compare()
        self.flush()
        return self.result

    def run_row(self, model, inputs, row: dict, schedule: dict, gpus: int) -> dict:
        args = self.args
        knobs = row_knobs(row, self.family)
        handle = install(model, knobs, block=self.geom["block"], backend=self.backend, timing=False)
        kinds = schedule[self.contexts[0]]
        out: dict = {"forward_ms": {}, "ran": {}, "density": {}}
        dense = self.result["rows"].get("dense", {}).get(f"gpus_{gpus}")
        share = not args.no_share_dense and row["name"] not in ("stock", "dense") and dense is not None
        if share and "dense" in dense["forward_ms"]:
            out["forward_ms"]["dense"] = dense["forward_ms"]["dense"]
            out["dense_from"] = "dense"
        try:
            for kind, step in visits(kinds):
                if kind in out["forward_ms"]:
                    continue
                for _ in range(args.warmup):
                    forward_call(model, inputs, self.contexts[0], step, self.steps, self.device)
                times = []
                for _ in range(args.repeats):
                    ms, y = timed_ms(
                        lambda step=step: forward_call(
                            model, inputs, self.contexts[0], step, self.steps, self.device
                        ),
                        self.device,
                    )
                    times.append(ms)
                out["forward_ms"][kind] = statistics.median(times)
                if not torch.isfinite(y).all():
                    raise RuntimeError(f"{row['name']}: non-finite output at step {step} ({kind})")
                self._keep(row["name"], kind, gpus, y)
                if handle is not None:
                    records = handle.stats(all_ranks=gpus > 1).records
                    last = records[-len(handle.layers) :]
                    out["ran"][kind] = classify(last, len(handle.layers))
                    out["density"][kind] = statistics.fmean(r["density"] for r in last)
        finally:
            uninstall(model)
        per_step = [out["forward_ms"].get(kind) for ctx in self.contexts for kind in schedule[ctx]]
        out["estimate_s"] = None if None in per_step else sum(per_step) / 1e3
        out["kinds_as_probed"] = all(out["ran"].get(k, k) == k for k in out["forward_ms"])
        return out

    def _keep(self, row: str, kind: str, gpus: int, y: torch.Tensor) -> None:
        key = (row, kind)
        if gpus == 1:
            self.outputs[key] = y.detach().clone()
        else:
            ref = self.outputs.get(key)
            errors = self.result["rows"][row].setdefault("rel_err", {})
            errors[kind] = rel_err(y, ref) if ref is not None else None

    def compare(self) -> None:
        tol = self.args.tol
        rows = self.result["rows"]
        n = f"gpus_{self.world}"
        stock = rows.get("stock", {})
        for entry in rows.values():
            if "gpus_1" not in entry or n not in entry:
                continue
            one, many = entry["gpus_1"], entry[n]
            errors = entry.get("rel_err", {})
            same_kinds = one["ran"] == many["ran"] and one["kinds_as_probed"] and many["kinds_as_probed"]
            ok = same_kinds and bool(errors) and all(e is not None and e <= tol for e in errors.values())
            entry["check"] = {
                "ok": ok,
                "same_kinds": same_kinds,
                "max_rel_err": max(errors.values(), default=None),
            }
            if not ok or one["estimate_s"] is None or many["estimate_s"] is None:
                entry["speedup"] = None
                continue
            est = many["estimate_s"]
            entry["speedup"] = {
                "cp": one["estimate_s"] / est,
                "vs_stock_1gpu": _ratio(stock.get("gpus_1", {}).get("estimate_s"), est),
                "vs_stock_cp": _ratio(stock.get(n, {}).get("estimate_s"), est),
            }

    def _line(self, name: str, gpus: int) -> str:
        r = self.result["rows"][name][f"gpus_{gpus}"]
        times = ", ".join(f"{k} {v:.0f} ms" for k, v in r["forward_ms"].items())
        est = r["estimate_s"]
        return f"{times}; {self.steps}-step estimate {est:.1f} s" if est is not None else times


def _ratio(a, b):
    return a / b if a is not None and b else None


def _letter(kind: str) -> str:
    return {"dense": "D", "sparse": "S", "fused_search": "F", "cached_search": "C"}.get(
        kind, kind[:1].upper()
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="wan14b_720p_81f", help="a bench_e2e geometry (Wan family)")
    parser.add_argument("--smoke", action="store_true", help="tiny Wan on the CPU over gloo")
    parser.add_argument(
        "--rows", help=f"comma-separated bench_e2e row names (default {','.join(DEFAULT_ROWS)})"
    )
    parser.add_argument("--steps", type=int, help="denoising steps of the estimate (default 50; smoke 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per visited step")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per visited step (median)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--no-share-dense", action="store_true", help="visit every row's dense steps")
    parser.add_argument("--tol", type=float, default=3e-2, help="relative L2 error allowed, N GPUs vs 1")
    parser.add_argument("--out", help="result JSON path")
    args = parser.parse_args(argv)
    if not args.smoke and GEOMETRIES.get(args.geometry, {}).get("family") != "wan":
        parser.error(f"--geometry must be a Wan geometry of bench_e2e, got {args.geometry!r}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs CUDA devices (use --smoke on the CPU)")
    if "RANK" not in os.environ:
        parser.error("launch with torchrun --standalone --nproc_per_node N (N >= 2)")
    dist.init_process_group("gloo" if args.smoke else "nccl", timeout=datetime.timedelta(hours=2))
    try:
        if dist.get_world_size() < 2:
            parser.error("needs at least 2 processes (torchrun --nproc_per_node N, N >= 2)")
        if args.smoke:
            torch.set_num_threads(1)
        result = Bench(args).run()
        dist.barrier()  # no rank tears its connections down while another still uses them
        return result
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
