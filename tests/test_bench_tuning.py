"""benchmarks/bench_tuning.py: how it scores the tuners' picks, and its CPU smoke run (fresh processes)."""

from __future__ import annotations

import json

import pytest
from _bench import load_benchmark


def test_summary_scores_each_pick_against_the_fastest_tile(monkeypatch):
    module = load_benchmark("bench_tuning", monkeypatch)
    tiles = {"a": 10.0, "b": 11.0, "c": "OutOfResources: shared memory"}
    trials = [
        {"tuner": "triton", "preheat_ms": 0.0, "pick": "b", "tuning": {"seconds": 2.0}},
        {"tuner": "triton", "preheat_ms": 0.0, "pick": "a", "tuning": {"seconds": 4.0}},
        {"tuner": "interleaved", "preheat_ms": 0.0, "pick": "a", "tuning": {"seconds": 1.0}},
        {"tuner": "interleaved", "preheat_ms": 0.0, "error": "Traceback ..."},
    ]
    s = module.summarise(trials, tiles)
    tri, inter = s["triton preheat 0 ms"], s["interleaved preheat 0 ms"]
    assert tri["picks"] == {"b": 1, "a": 1} and tri["regret"] == pytest.approx([1.1, 1.0])
    assert tri["regret_mean"] == pytest.approx(1.05) and tri["regret_max"] == pytest.approx(1.1)
    assert tri["tuning_s_median"] == 3.0
    assert inter["picks"] == {"a": 1} and inter["regret_max"] == 1.0


@pytest.mark.interpret
def test_smoke_run_tunes_in_fresh_processes(tmp_path, monkeypatch):
    module = load_benchmark("bench_tuning", monkeypatch)
    out = tmp_path / "tuning.json"
    module.main(["--smoke", "--trials", "1", "--preheat", "0", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [t["tuner"] for t in report["trials"]] == ["triton", "interleaved"]
    assert all("error" not in t for t in report["trials"]), report["trials"]
    assert {t["tuning"]["tuner"] for t in report["trials"]} == {"triton", "interleaved"}
    (tile,) = report["tiles_ms"]  # the interpreter has one candidate
    assert all(t["pick"] == tile and t["regret"] == 1.0 for t in report["trials"])
