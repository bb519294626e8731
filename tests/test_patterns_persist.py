"""Saved pattern sets: written at the end of a run, loaded into another handle, refused on a model or
geometry mismatch (CPU, tiny Wan pipelines)."""

from __future__ import annotations

import pytest
import torch
from _tiny import run_wan, wan_pipeline, wan_transformer

import dit_accel
from dit_accel.methods.persist import load_patterns

BLOCKS = {"block_q": 16, "block_k": 16}


def _kinds(handle, context="cond"):
    return [
        r["kind"]
        for r in handle.stats().records
        if r["context"] == context and r["layer"] == handle.layers[1]
    ]


def test_adaspa_plans_round_trip(tmp_path):
    path = tmp_path / "wan_adaspa.safetensors"
    pipe = wan_pipeline()
    handle = dit_accel.apply(pipe, method="adaspa", save_patterns=str(path), **BLOCKS)
    run_wan(pipe, steps=5, frames=33)
    assert _kinds(handle) == ["dense", "fused_search", "sparse", "cached_search", "sparse"]
    saved = load_patterns(path)
    assert saved.meta["method"] == "adaspa" and saved.meta["models"] == {
        "transformer": ["WanTransformer3DModel", 2]
    }
    assert saved.meta["knobs"]["sparsity"] == 0.8
    # Each (context, layer) kept the fused search's plan (step 1) and the cached search's (step 3).
    assert sorted(saved.plans) == sorted((c, layer) for c in ("cond", "uncond") for layer in handle.layers)
    assert all([h[0] for h in hist] == [1, 3] for hist in saved.plans.values())

    used = []
    loaded = dit_accel.apply(pipe, method="adaspa", patterns=str(path), **BLOCKS)
    real = loaded.method.attention

    def spy(q, k, v, call):
        out = real(q, k, v, call)
        used.append((call.context, call.layer, call.step, call.entry.plan))
        return out

    loaded.method.attention = spy
    out = run_wan(pipe, steps=5, frames=33)
    assert torch.isfinite(out).all()
    assert _kinds(loaded) == ["dense", "sparse", "sparse", "sparse", "sparse"], "no searches with saved plans"
    for context, layer, step, plan in used:
        if step == 0:
            continue
        history = saved.plans[(context, layer)]
        expected = [h for h in history if h[0] <= step][-1][2]
        assert torch.equal(plan.kv_indices, expected.kv_indices) and torch.equal(
            plan.kv_counts, expected.kv_counts
        )


def test_rettention_with_saved_radial_plans_still_refreshes(tmp_path):
    path = tmp_path / "wan_radial.safetensors"
    pipe = wan_pipeline()
    dit_accel.apply(
        pipe, method="rettention", base="radial", dense_steps=1, save_patterns=str(path), **BLOCKS
    )
    first = run_wan(pipe, steps=4, frames=33)
    handle = dit_accel.apply(
        pipe, method="rettention", base="radial", dense_steps=1, patterns=str(path), **BLOCKS
    )
    second = run_wan(pipe, steps=4, frames=33)
    assert _kinds(handle) == ["dense", "refresh", "corrected", "corrected"]
    torch.testing.assert_close(second, first, atol=1e-5, rtol=0)


def test_mismatches_are_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    pipe = wan_pipeline()
    dit_accel.apply(pipe, method="window", density=0.3, dense_steps=0, save_patterns=str(path), **BLOCKS)
    run_wan(pipe, steps=2, frames=33)
    other = wan_transformer(num_layers=3)
    with pytest.raises(ValueError, match="saved for"):
        dit_accel.apply(other, method="window", patterns=str(path), **BLOCKS)
    dit_accel.apply(pipe, method="window", density=0.3, dense_steps=0, patterns=str(path), **BLOCKS)
    with pytest.raises(ValueError, match="saved for"):
        run_wan(pipe, steps=2, frames=25)  # another frame count: another geometry
    with pytest.raises(FileNotFoundError):
        dit_accel.apply(pipe, method="window", patterns=str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a dit_accel pattern file"):
        dit_accel.apply(pipe, method="window", patterns=str(tmp_path / "junk.safetensors"))


def test_dense_layers_must_exist():
    pipe = wan_pipeline()
    with pytest.raises(ValueError, match="dense_layers \\[2\\]"):
        dit_accel.apply(pipe, method="window", dense_layers=(2,))
    with pytest.raises(ValueError, match="dense_layers \\[-3\\]"):
        dit_accel.apply(pipe, method="radial", dense_layers=(-3,))
    dit_accel.apply(pipe, method="window", dense_layers=(-2, 1))
