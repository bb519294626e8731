"""benchmarks/host_breakdown.py: its CPU smoke run times every configuration and writes the JSON."""

from __future__ import annotations

import json

from _bench import load_benchmark


def test_smoke_run_times_every_configuration(tmp_path, monkeypatch):
    module = load_benchmark("host_breakdown", monkeypatch)
    out = tmp_path / "hb.json"
    module.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    assert list(report["configs"]) == list(module.CONFIGS)
    assert report["steps"] == 2 and report["geometry"]["hidden_states"][0] == 1
    for name, row in report["configs"].items():
        assert row["wall_ms_per_forward"] >= row["host_ms_per_forward"] > 0
        # every forward of the per-forward run sits under its step's kind
        assert sum(k["forwards_per_run"] for k in row["kinds"].values()) == 4, row["kinds"]
        assert all(k["host_ms_per_forward"] > 0 for k in row["kinds"].values())
        if module.CONFIGS[name] is None:
            assert "runtime.attend" not in row  # stock never enters dit_accel
        else:  # 6 layers x 2 contexts x 2 steps, each through dit_accel's runtime
            assert row["runtime.attend"]["calls"] == 24 and row["runtime.attend"]["us_per_call"] > 0
            by_kind = row["runtime.attend_by_kind"]
            assert sum(v["calls"] for v in by_kind.values()) == 24, by_kind
            assert all(v["us_per_call_median"] > 0 for v in by_kind.values())
    assert set(report["configs"]["stock"]["kinds"]) == {"dense"}
    assert set(report["configs"]["balanced"]["kinds"]) <= {"dense", "refresh", "corrected"}
    assert set(report["configs"]["balanced"]["runtime.attend_by_kind"]) <= {"dense", "refresh", "corrected"}
