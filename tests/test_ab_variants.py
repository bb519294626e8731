"""The A/B scripts' kernel variants still build from today's sources. Their timing needs a GPU, the text they
substitute does not: a kernel edit that removes a substituted text must fail here, not on the GPU."""

from __future__ import annotations

import sys

import pytest
from _bench import BENCHMARKS, load_benchmark


def _unload_variants():
    for name in [m for m in sys.modules if m.startswith("ab_")]:
        del sys.modules[name]


def test_block_mass_variants_build(monkeypatch, tmp_path):
    ab = load_benchmark("ab_block_mass", monkeypatch)
    before = tmp_path / "before.py"
    before.write_text((BENCHMARKS.parent / "kernels" / "triton_mass.py").read_text())
    names = ["before", "before+all_tiles", *ab.VARIANTS, "chunk32+all_tiles"]
    try:
        mods = ab.build_variants(names, before, tmp_path / "pkgs")
        chunks = {name: mod.CHUNK for name, mod in mods.items()}
        assert chunks["current"] == 16 and chunks["chunk1"] == 1 and chunks["chunk8"] == 8
        assert chunks["chunk32+all_tiles"] == 32
        # Each variant is its own module: its own kernel object and autotuner.
        assert len({id(mod._block_mass_kernel) for mod in mods.values()}) == len(names)
        n_tiles = {name: len(mod._block_mass_kernel.configs) for name, mod in mods.items()}
        assert n_tiles["all_tiles"] == n_tiles["before+all_tiles"] == 12
    finally:
        _unload_variants()


def test_plan_loop_variants_build(monkeypatch, tmp_path):
    ab = load_benchmark("ab_plan_loop", monkeypatch)
    try:
        mods = ab.build_variants(list(ab.VARIANTS), tmp_path)
        assert set(mods) == set(ab.VARIANTS)
    finally:
        _unload_variants()


def test_a_missing_text_fails_loudly(monkeypatch, tmp_path):
    ab = load_benchmark("ab_block_mass", monkeypatch)
    monkeypatch.setitem(ab.VARIANTS, "chunk8", [("CHUNK = 1234\n", "CHUNK = 8\n")])
    with pytest.raises(SystemExit, match="no longer contains"):
        ab.build_variants(["chunk8"], None, tmp_path)
