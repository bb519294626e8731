"""benchmarks/bench_radial.py and bench_adaspa.py: their CPU smoke runs take the GPU runs' code paths (plans
from the family defaults, the kernels against their oracle, a Wan forward under the method with its stats),
so an API they use cannot change under them unnoticed."""

from __future__ import annotations

import json

from _bench import load_benchmark


def test_radial_smoke_run(tmp_path, monkeypatch):
    module = load_benchmark("bench_radial", monkeypatch)
    out = tmp_path / "radial.json"
    module.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    from dit_accel.processors.wan import FAMILY

    wan = FAMILY.defaults["radial"]
    assert report["knobs"]["decay"] == wan["decay"] and report["knobs"]["sink_frame"] == wan["sink_frame"]
    assert list(report["shapes"]) == ["smoke_a", "smoke_b"]
    for name, shape in report["shapes"].items():
        assert 0 < shape["plan_density"] < 1, name
        assert shape["attention"]["correct"], name
        forward = shape["forward"]
        assert forward["stats_pattern_ok"] and forward["output_finite"], name
        assert forward["vs_stock"]["cosine"] > 0.99, name
        assert shape["composed_50_steps"]["12_of_50"]["dense_steps"] == 12


def test_adaspa_smoke_run(tmp_path, monkeypatch):
    module = load_benchmark("bench_adaspa", monkeypatch)
    out = tmp_path / "adaspa.json"
    module.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["correct"] and report["device"] == "cpu"
    forward = report["forward"]
    assert set(forward["schedule"]) == {"dense", "fused_search", "cached_search", "sparse"}
    for key, run in forward["per_sparsity"].items():
        assert run["correct"], key
        assert set(run["phases_seen"].values()) == {"dense", "fused_search", "sparse", "cached_search"}, key
