"""benchmarks/profile_embedded.py: its CPU smoke run writes every part it promises."""

from __future__ import annotations

import json

from _bench import load_benchmark


def test_smoke_run_writes_every_configuration_and_the_one_call_table(tmp_path, monkeypatch):
    module = load_benchmark("profile_embedded", monkeypatch)
    out = tmp_path / "profile.json"
    module.main(["--smoke", "--out", str(out)])
    report = json.loads(out.read_text())
    names = [name for name, *_ in module._variants()]
    assert list(report["renders"]) == names and "radial@jit" in names
    for row in report["renders"].values():
        assert row["seconds"] > 0 and len(row["all_seconds"]) == 1
        assert len(row["python_top"]) == 20 and all(
            f["cumulative_ms"] >= f["own_ms"] >= 0 for f in row["python_top"]
        )
    one = report["one_call"]
    assert one["shape"] == [1, 6, 5 * 6 * 8, 64]  # CPU geometry 17x96x128: 5 latent frames of 6x8 tokens
    for path in ("sdpa", "sparse_1.0", "sparse_0.5", "sparse_0.25"):
        assert 0 < one[path]["host_ms_per_call"] <= one[path]["ms_per_call"]


def _renders_only(module, out, configs: str) -> None:
    """The CPU smoke run's timed renders of ``configs`` only, one round, written to ``out``."""
    flags = ["--renders-only", "--no-profile", "--no-jit", "--configs", configs]
    module.main(["--smoke", "--out", str(out), *flags])


def test_renders_only_subset_reports_ratio_to_dense_per_round(tmp_path, monkeypatch):
    module = load_benchmark("profile_embedded", monkeypatch)
    out = tmp_path / "renders.json"
    _renders_only(module, out, "dense,radial,radial@uncached,dense+blocks")
    report = json.loads(out.read_text())
    assert "one_call" not in report
    assert list(report["renders"]) == ["dense", "radial", "radial@uncached", "dense+blocks"]
    assert module.CONFIGS["dense+blocks"] == {"method": "dense", "fuse_blocks": True}
    # the fused row was rendered against an unfused one first: on the CPU both are the eager arithmetic
    fused = report["renders"]["dense+blocks"]
    assert fused["blocks_max_abs_diff"] == 0.0 and fused["blocks_psnr_db"] == float("inf")
    dense, radial = report["renders"]["dense"], report["renders"]["radial"]
    assert "python_top" not in radial
    assert radial["speedup_vs_dense"] == dense["all_seconds"][0] / radial["all_seconds"][0]
    assert dense["speedup_vs_dense"] == 1.0 and radial["rounds_faster_than_dense"] in (0, 1)
    try:
        module.main(["--smoke", "--renders-only", "--configs", "nope"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("an unknown --configs name must be an argparse error")


def test_graphed_rows_are_checked_against_eager_before_timing(tmp_path, monkeypatch):
    """On the CPU every forward of a ``+graphs`` row runs eagerly: the check marks the row failed (no replayed
    forward) and it is not timed."""
    module = load_benchmark("profile_embedded", monkeypatch)
    out = tmp_path / "graphs.json"
    _renders_only(module, out, "dense,dense+graphs")
    rows = json.loads(out.read_text())["renders"]
    graphed = rows["dense+graphs"]
    assert graphed["graphs_check"] == "failed" and graphed["graphs_max_abs_diff"] == 0.0
    assert graphed["graphs"]["eager: an input tensor is not on a cuda device"] == graphed["graphs"]["eager"]
    assert "seconds" not in graphed and rows["dense"]["seconds"] > 0
    assert "dense+graphs" not in [name for name, *_ in module._variants()]  # only when named
