"""benchmarks/bench_cpu_path.py: its smoke run captures a preset's sparse call and times both paths."""

from __future__ import annotations

import json

from _bench import load_benchmark


def test_smoke_run_times_calls_and_renders_on_both_paths(tmp_path, monkeypatch):
    module = load_benchmark("bench_cpu_path", monkeypatch)
    out = tmp_path / "cpu.json"
    module.main(["--smoke", "--presets", "adaspa:sparsity=0.9,balanced", "--out", str(out)])
    report = json.loads(out.read_text())
    # balanced is re-ttention on Wan: every sparse call carries a correction, so only adaspa's is captured
    assert "balanced" not in report["calls"]
    call = report["calls"]["adaspa:sparsity=0.9"]
    assert call["sparse_cpu_path_ms"] > 0 and call["sparse_reference_ms"] > 0
    assert 0 < call["plan_density"] <= 1
    for path in ("cpu_path", "reference"):
        names = [r["name"] for r in report["renders"][path]]
        assert names == ["stock", "adaspa:sparsity=0.9", "balanced"]
        assert all(r["error"] is None for r in report["renders"][path])
