"""The A/B scripts' kernel variants still build from today's sources. Their timing needs a GPU, the text they
substitute does not: a kernel edit that removes a substituted text must fail here, not on the GPU."""

from __future__ import annotations

import sys

import pytest
import torch
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
        # Every variant computes the same attention: a sparse plan whose rows have a partial last key block,
        # with key scales that move the running maximum by more and by less than the lazy-rescaling
        # threshold. (Interpreted on the CPU; the GPU run only records the differences.)
        import torch

        from dit_accel.kernels import BlockPlan

        g = torch.Generator().manual_seed(0)
        s, h, d = 72, 2, 32
        q, k, v = (torch.randn(1, h, s, d, generator=g) for _ in "qkv")
        k = k * torch.tensor([0.5, 3.0, 0.7, 9.0, 1.0])[:, None].expand(5, 16).reshape(-1)[:s, None]
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        mask = torch.rand(1, h, 5, 5, generator=g) < 0.6
        mask[..., -1] = True
        mask[0, 0, 1] = True  # one full row: the dense-loop shortcut
        plan = BlockPlan.from_block_mask(mask, 16, 16)
        outs = {
            name: mod.sparse_attention_fwd(q, k, v, plan.kv_indices, plan.kv_counts, 16, 16, d**-0.5, None)
            for name, mod in mods.items()
        }
        for name, (out, lse) in outs.items():
            torch.testing.assert_close(out.float(), outs["current"][0].float(), atol=2e-2, rtol=0, msg=name)
            torch.testing.assert_close(lse, outs["current"][1], atol=1e-3, rtol=0, msg=name)
    finally:
        _unload_variants()


def test_a_missing_text_fails_loudly(monkeypatch, tmp_path):
    ab = load_benchmark("ab_block_mass", monkeypatch)
    monkeypatch.setitem(ab.VARIANTS, "chunk8", [("CHUNK = 1234\n", "CHUNK = 8\n")])
    with pytest.raises(SystemExit, match="no longer contains"):
        ab.build_variants(["chunk8"], None, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU interpreter's")
def test_refresh_walk_smoke_checks_both_walks(monkeypatch, tmp_path):
    """ab_refresh_walk's CPU smoke run checks the skip and masked walks against each other and restores the
    kernel's walk choice and the call cache afterwards."""
    import json

    from dit_accel.kernels import ops, triton_refresh

    ab = load_benchmark("ab_refresh_walk", monkeypatch)
    default = triton_refresh.MASKED_WALK_MAX_BLOCK
    out = tmp_path / "walk.json"
    ab.main(["--smoke", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(ab.DENSITIES) and all(r["ok"] for r in rows), rows
    assert all(r["errors"]["out"] < ab.TOL["out"] for r in rows)
    assert triton_refresh.MASKED_WALK_MAX_BLOCK == default and ops._CALL_CACHE


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU interpreter's")
def test_refresh_paths_smoke_checks_every_path(monkeypatch, tmp_path):
    """ab_refresh_paths' CPU smoke run checks the two-pass refreshes (statistics epilogue and torch ops)
    against the one-pass kernel."""
    import json

    ab = load_benchmark("ab_refresh_paths", monkeypatch)
    out = tmp_path / "paths.json"
    ab.main(["--smoke", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ok"] and set(row["errors_vs_fused"]) == {"split", "split_torch"}, row
    assert all(e["rho"] < ab.TOL["rho"] for e in row["errors_vs_fused"].values())


def test_kernel_sweep_launches_each_variant(monkeypatch):
    """bench_kernels' --sweep launches the sparse kernel with a fixed tile, loop and launch options: the
    launch the kernel's own launcher makes, recorded, with the variant in place of the tuned config. Each
    variant computes the reference attention; the dense loop ignores the plan. (Interpreted on the CPU.)"""
    from dit_accel.kernels import BlockPlan
    from dit_accel.kernels.reference import attention_reference

    bench = load_benchmark("bench_kernels", monkeypatch)
    g = torch.Generator().manual_seed(1)
    s, h, d = 72, 2, 32
    q, k, v = (torch.randn(1, h, s, d, generator=g).to(torch.bfloat16) for _ in "qkv")
    mask = torch.rand(1, h, 3, 3, generator=g) < 0.5
    mask[..., 0] = True
    sparse = BlockPlan.from_block_mask(mask, 32, 32)
    dense = BlockPlan.from_block_mask(torch.ones(1, h, 3, 3, dtype=torch.bool), 32, 32)
    cases = [
        (sparse, (16, 16, 4, 1, False, False)),
        (sparse, (32, 16, 4, 1, False, False)),  # another tile: another grid
        (dense, (16, 16, 4, 1, False, True)),
    ]
    for plan, variant in cases:
        ref, ref_lse = attention_reference(q, k, v, plan, d**-0.5)
        out, lse = bench.variant_call(q, k, v, plan, variant)()
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0, msg=str(variant))
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0, msg=str(variant))
    # The override takes effect: the grid is built for 32-row tiles (3 programs over 72 rows), so a launch
    # that kept the tuned 16-row tile would leave rows 48-71 unwritten.
    call = bench.variant_call(q, k, v, sparse, (32, 16, 4, 1, False, False))
    call()[0].fill_(float("nan"))
    assert not call()[0].isnan().any()
