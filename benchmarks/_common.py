"""Helpers shared by the benchmark scripts: timing, error metrics, environment records."""

from __future__ import annotations

import importlib.metadata
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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


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
