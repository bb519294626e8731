"""benchmarks/bench_real_plans.py: the plans it captures from a run, the synthetic twins it builds, its CPU
smoke run."""

from __future__ import annotations

import json

import pytest
import torch
from _bench import load_benchmark

from dit_accel.kernels import BlockPlan


def _plan(rows: list[list[int]], n_kb: int) -> BlockPlan:
    mask = torch.zeros(1, 1, len(rows), n_kb, dtype=torch.bool)
    for i, cols in enumerate(rows):
        mask[0, 0, i, cols] = True
    return BlockPlan.from_block_mask(mask, 16, 16)


def test_plan_structure_counts_runs_and_the_last_block(monkeypatch):
    module = load_benchmark("bench_real_plans", monkeypatch)
    s = module.plan_structure(_plan([[0, 1, 2, 5], [3, 7], [7]], 8))
    assert (s["count_min"], s["count_max"]) == (1, 4)
    assert s["count_mean"] == pytest.approx(7 / 3)
    assert s["rows_holding_last_block"] == pytest.approx(2 / 3)
    assert s["mean_run_blocks"] == pytest.approx(7 / 5)  # runs: 0-2, 5 | 3, 7 | 7


def test_synthetic_twin_keeps_every_row_count_and_moves_the_blocks(monkeypatch):
    module = load_benchmark("bench_real_plans", monkeypatch)
    mask = torch.zeros(1, 3, 20, 40, dtype=torch.bool)
    for h in range(3):
        for r in range(20):
            mask[0, h, r, r : r + 2 + h + r % 5] = True
    plan = BlockPlan.from_block_mask(mask, 16, 16)
    twin = module.synthetic_like(plan)
    assert torch.equal(twin.kv_counts, plan.kv_counts)
    assert not torch.equal(twin.to_block_mask(), plan.to_block_mask())
    assert module.plan_structure(twin)["mean_run_blocks"] < module.plan_structure(plan)["mean_run_blocks"]


@pytest.mark.interpret
def test_smoke_run_captures_the_runs_sparse_calls(tmp_path, monkeypatch):
    module = load_benchmark("bench_real_plans", monkeypatch)
    out = tmp_path / "plans.json"
    module.main(["--smoke", "--layers", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["schedule"][report["sparse_step"]] == "sparse" and report["device"] == "cpu"
    (call,) = report["calls"]
    assert call["layer"].endswith("attn1") and call["in_run_ms"] > 0
    assert call["err_vs_torch"] < 2e-3  # the interpreted kernel on the captured call against the torch path
    assert call["synthetic_density"] == pytest.approx(call["structure"]["density"])
    for name in ("real", "real_randn", "synthetic", "cudnn"):
        assert call[name]["ms"] > 0
    assert report["tiles_ms"] and call["tuned"] in report["tiles_ms"]
