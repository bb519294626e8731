"""The re-ttention kernel benchmark runs (CPU smoke mode), checks before it times, and writes its JSON."""

import json

from _bench import load_benchmark


def test_bench_rettention_smoke(tmp_path, monkeypatch):
    bench = load_benchmark("bench_rettention", monkeypatch)
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(not r["failed"] for r in rows)
    for r in rows:
        assert r["checks"]["corrected_fp32_identity"] < 1e-4, (
            "rho * O_sparse + R must rebuild the dense output"
        )
        assert {"refresh_fp32_ms", "corrected_fp8_ms", "sparse_ms", "refresh_two_pass_ms"} <= set(r)
        assert r["checks"]["two_pass_rho"] < 1e-5, "mask_statistics must give correction_from_outputs' rho"
