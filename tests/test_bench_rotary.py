"""benchmarks/bench_rotary.py: its CPU smoke run checks every shape's fused step against the stock ops."""

from __future__ import annotations

import json

import pytest
from _bench import load_benchmark


def test_smoke_run_is_bit_exact_at_every_shape(tmp_path, monkeypatch):
    module = load_benchmark("bench_rotary", monkeypatch)
    out = tmp_path / "rotary.json"
    module.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {r["shape"]: r for r in report["rows"]}
    assert list(rows) == list(module.SHAPES) and report["device"] == "cpu"
    for name, row in rows.items():
        assert row["bit_exact"], name
        assert row["stock_ms"] > 0 and row["fused_ms"] > 0
    assert rows["hunyuan_720p_129f_single"]["rotated"] < rows["hunyuan_720p_129f_single"]["tokens"]


def test_unknown_shape_is_refused(tmp_path, monkeypatch):
    module = load_benchmark("bench_rotary", monkeypatch)
    with pytest.raises(SystemExit):
        module.main(["--smoke", "--shapes", "wan9b", "--out", str(tmp_path / "x.json")])
