"""dit_accel under diffusers' context parallelism, on CPU.

Single process: the merge of attention over disjoint key shards by LSE (what ring attention needs), the
token regrouping of the Ulysses path, searched plans per head shard, the merge of the ranks' stats.

Two real processes over gloo (``torch.multiprocessing`` spawn): the tiny Wan transformer under diffusers'
own ``enable_parallelism(ContextParallelConfig(ulysses_degree=2))``, with dit_accel applied (dense, window,
radial, adaspa, rettention; reference backend), gives the single-process output of the same method at
every step, and ``handle.stats(all_ranks=True)`` gives the single-process stats; the same for Flux (text
first, single blocks, dit_accel applied before ``enable_parallelism``), also with regional
``torch.compile``, and for Qwen-Image (text first).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import dit_accel
from dit_accel import parallel
from dit_accel.kernels import BlockPlan, block_sparse_attention, dense_attention, merge_partial_attention
from dit_accel.methods.adaspa import fused_search

WORLD = 2


# --------------------------------------------------------------------------------------------------
# merging partial attention over key shards
# --------------------------------------------------------------------------------------------------
def _qkv(b, sq, sk, h, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=g).to(dtype) for s in (sq, sk, sk))


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_merge_two_key_shards_equals_full_attention_with_empty_rows(layout):
    q, k, v = _qkv(3, 37, 77, 2, 24)
    split = 48
    # batch 1: no key in shard 2; batch 2: no key at all
    kv_len = torch.tensor([77, 40, 0], dtype=torch.int32)
    if layout == "bhsd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    s = 1 if layout == "bshd" else 2
    k1, k2 = k.split([split, k.shape[s] - split], dim=s)
    v1, v2 = v.split([split, v.shape[s] - split], dim=s)
    full, full_lse = dense_attention(q, k, v, kv_len=kv_len, layout=layout, backend="torch")
    o1, l1 = dense_attention(q, k1, v1, kv_len=kv_len.clamp(max=split), layout=layout, backend="torch")
    o2, l2 = dense_attention(q, k2, v2, kv_len=(kv_len - split).clamp(min=0), layout=layout, backend="torch")
    assert torch.isinf(l2[1]).all() and torch.isinf(l1[2]).all()
    out, lse = merge_partial_attention([o1, o2], [l1, l2], layout=layout)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:2], full_lse[:2], atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()


def test_merge_sparse_plan_restricted_to_each_key_shard():
    """A block plan over all keys equals the merge of its restrictions to two key shards (shard boundary on
    a key-block boundary), rows that keep no block of a shard included."""
    q, k, v = _qkv(1, 50, 80, 2, 16, seed=1)
    bq = bk = 16
    nq, nk = 4, 5
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(1, 2, nq, nk, generator=g) < 0.5
    mask[0, 0, 0] = torch.tensor([True, True, False, False, False])  # no block of shard 2
    mask[0, 1, 1] = torch.tensor([False, False, True, False, True])  # no block of shard 1
    full_plan = BlockPlan.from_block_mask(mask, bq, bk)
    full, full_lse = block_sparse_attention(q, k, v, full_plan, backend="torch")
    split_blocks = 2
    outs, lses = [], []
    for lo, hi in ((0, split_blocks), (split_blocks, nk)):
        plan = BlockPlan.from_block_mask(mask[..., lo:hi].contiguous(), bq, bk)
        keys = slice(lo * bk, hi * bk)
        o, lse = block_sparse_attention(q, k[:, keys], v[:, keys], plan, backend="torch")
        outs.append(o)
        lses.append(lse)
    assert torch.isneginf(lses[1][0, 0, :bq]).all() and torch.isneginf(lses[0][0, 1, bq : 2 * bq]).all()
    out, lse = merge_partial_attention(outs, lses)
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(full_lse)
    torch.testing.assert_close(lse[finite], full_lse[finite])
    assert torch.equal(torch.isfinite(lse), finite)


def test_merge_keeps_half_precision_and_checks_shapes():
    q, k, v = _qkv(1, 20, 32, 2, 16, dtype=torch.bfloat16)
    o1, l1 = dense_attention(q, k[:, :16], v[:, :16], backend="torch")
    o2, l2 = dense_attention(q, k[:, 16:], v[:, 16:], backend="torch")
    out, lse = merge_partial_attention([o1, o2], [l1, l2])
    ref, ref_lse = dense_attention(q, k, v, backend="torch")
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="one LSE per output"):
        merge_partial_attention([o1, o2], [l1])
    with pytest.raises(ValueError, match="lse 1"):
        merge_partial_attention([o1, o2], [l1, l2[:, :1]])


# --------------------------------------------------------------------------------------------------
# Ulysses token order, searched plans per head shard, stats of several ranks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("segments", [(7,), (3, 4), (4, 3), (0, 7)], ids=lambda s: "-".join(map(str, s)))
def test_token_regrouping_of_joined_streams(segments):
    """Ranks hold [text shard, image shard]; the exchanged sequence is rank-major; regrouping gives
    [all text, all image] (the model's order) and the inverse undoes it."""
    degree, heads = 3, 2
    streams = [torch.arange(degree * n).float() + 1000 * i for i, n in enumerate(segments)]
    ranks = [torch.cat([s.chunk(degree)[r] for s in streams]) for r in range(degree)]
    exchanged = torch.cat(ranks)[None, :, None].expand(1, -1, heads)  # [1, S, H]
    model_order = torch.cat(streams)
    regrouped = parallel._to_token_order(exchanged, segments, degree)
    assert torch.equal(regrouped[0, :, 0], model_order)
    assert torch.equal(parallel._to_rank_order(regrouped, segments, degree), exchanged)


def test_searched_plan_of_a_head_shard_is_that_shard_of_the_whole_plan():
    """Ulysses gives each rank H/P heads: the plan searched on those heads alone is the whole layer's plan
    restricted to them (top-k per head), so searched state can stay on its rank."""
    q, k, v = _qkv(1, 96, 96, 4, 16, seed=3)
    kw = {"sparsity": 0.5, "block_q": 16, "block_k": 16, "backend": "torch"}
    out, lse, plan, _ = fused_search(q, k, v, **kw)
    for heads in (slice(0, 2), slice(2, 4)):
        o, l, p, _ = fused_search(q[:, :, heads], k[:, :, heads], v[:, :, heads], **kw)
        assert torch.equal(p.to_block_mask(), plan.to_block_mask()[:, heads])
        torch.testing.assert_close(o, out[:, :, heads])
        torch.testing.assert_close(l, lse[:, heads])


def _record(step, kind, density, time_ms=None, layer="transformer.blocks.0.attn1"):
    return {
        "run": 1, "component": "transformer", "context": "cond", "step": step, "layer": layer, "kind": kind,
        "density": density, "time_ms": time_ms,
    }  # fmt: skip


def test_merge_rank_stats_averages_density_and_checks_agreement():
    r0 = [_record(0, "dense", 1.0, 2.0), _record(1, "sparse", 0.25, 1.0)]
    r1 = [_record(0, "dense", 1.0, 3.0), _record(1, "sparse", 0.75, 0.5)]
    # fmt: off
    m0 = {"lse": 100, "plans": 10, "total": 110, "budget": 1000, "dropped": {"lse": 1}}
    m1 = {"lse": 100, "plans": 30, "total": 130, "budget": 1000, "dropped": {"lse": 2}}
    records, memory = parallel.merge_rank_stats([(r0, m0), (r1, m1)])
    assert [r["density"] for r in records] == [1.0, 0.5]
    assert [r["time_ms"] for r in records] == [3.0, 1.0]
    assert records[1]["rank_density"] == [0.25, 0.75]
    assert memory == {"lse": 200, "plans": 40, "total": 240, "budget": 1000, "dropped": {"lse": 3},
                      "ranks": 2}
    # fmt: on
    stats = dit_accel.AttentionStats("window", records, memory)
    assert stats.per_step()[1]["mean_density"] == 0.5
    with pytest.raises(RuntimeError, match="disagree"):
        parallel.merge_rank_stats([(r0, m0), ([r0[0], _record(2, "sparse", 0.5)], m1)])
    with pytest.raises(RuntimeError, match="recorded 1 attention calls"):
        parallel.merge_rank_stats([(r0, m0), (r0[:1], m1)])
    nan = [_record(0, "custom", float("nan")), _record(1, "sparse", 0.5)]
    records, _ = parallel.merge_rank_stats([(nan, {}), (nan, {})])
    assert math.isnan(records[0]["density"]) and records[1]["density"] == 0.5


def test_ring_and_uneven_modes_run_the_stock_context_parallel_op(caplog):
    """Ring attention (and Ulysses x ring, ulysses_anything, masks) run diffusers' own context-parallel
    attention (the processor's stock op), with one log line naming Ulysses as the supported mode."""

    class Proc:
        layer = "transformer.blocks.0.attn1"

    q = torch.randn(1, 8, 2, 4)
    sentinel = torch.full_like(q, 7.0)
    for ring, ulysses, anything, mask in ((2, 1, False, None), (2, 2, False, None), (1, 2, True, None),
                                          (1, 2, False, torch.ones(1, 8, dtype=torch.bool))):  # fmt: skip
        proc = Proc()
        cp = type("CP", (), {"ring_degree": ring, "ulysses_degree": ulysses, "ulysses_anything": anything})
        proc._parallel_config = type("PC", (), {"context_parallel_config": cp})
        with caplog.at_level(logging.WARNING, logger="dit_accel"):
            out = parallel.attend(
                proc, q, q, q, layout="bshd", dense_fn=lambda: sentinel, kv_len=None, text_len=0,
                text_position=None, attention_mask=mask,
            )  # fmt: skip
        assert out is sentinel
    assert "ring attention (ring_degree=2)" in caplog.text and "ulysses_degree=N" in caplog.text
    assert "Ulysses x ring" in caplog.text and "ulysses_anything" in caplog.text
    assert "attention mask" in caplog.text


def test_stats_all_ranks_without_a_process_group_is_the_local_stats():
    model = _wan4()
    handle = dit_accel.apply(model, method="window", density=0.5, dense_steps=1, **COMMON)
    _run(model, _wan_inputs(), steps=2)
    local, merged = handle.stats(), handle.stats(all_ranks=True)
    assert merged.records == local.records and len(local.records) == 4
    dit_accel.remove(model)


# --------------------------------------------------------------------------------------------------
# two processes over gloo
# --------------------------------------------------------------------------------------------------
STEPS = 5
COMMON = {"block_q": 16, "block_k": 16, "backend": "torch"}
WAN_METHODS = [
    ("dense", {}),
    ("window", {"density": 0.5, "dense_steps": 1}),
    ("radial", {"dense_steps": 1, "dense_layers": ()}),
    ("adaspa", {"sparsity": 0.5, "warmup": 1, "search_at": (3,), "head_adaptive": False}),
    ("rettention", {"density": 0.3, "dense_steps": 1, "refresh_every": 2}),
]


def _wan4(seed: int = 0):
    """The tiny Wan transformer of tests/_tiny.py with 4 heads (2 per rank under 2-way Ulysses)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip


def _wan_inputs():
    g = torch.Generator().manual_seed(1)
    # grid 8 x 4 x 8 = 256 tokens (128 per rank), 16 blocks of 16
    return {
        "hidden_states": torch.randn(1, 16, 8, 8, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
    }


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()  # fmt: skip


def _flux_inputs(batch=2, height=6, width=8, text=10):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return {
        "hidden_states": torch.randn(batch, height * width, 4, generator=g),
        "encoder_hidden_states": torch.randn(batch, text, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text, 3),
    }


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()  # fmt: skip


def _qwen_inputs(height=8, width=8, text=10):
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, height * width, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, text, 16, generator=g),
        "img_shapes": [[(1, height, width)]],
    }


def _run(model, x, steps=STEPS):
    outs = []
    for i in range(steps):
        t = torch.full((x["hidden_states"].shape[0],), 1.0 - 0.2 * i)
        with model.cache_context("cond", step_index=i, num_inference_steps=steps), torch.no_grad():
            outs.append(model(**x, timestep=t, return_dict=False)[0])
    return outs


def _enable_ulysses(model, degree: int = WORLD) -> None:
    """``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))`` on CPU.

    diffusers 0.42 picks the device as ``rank % torch.accelerator.device_count()``, which divides by zero
    without an accelerator. With a count of 1 it takes ``torch.device("cpu", 0)``; the rest (the device mesh
    over gloo, the processors' ``_parallel_config``, the ``_cp_plan`` hooks) runs unchanged.
    """
    from diffusers import ContextParallelConfig

    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    finally:
        torch.accelerator.device_count = count


class _Shapes(dit_accel.SparseMethod):
    """Records the q shape of every call and runs the stock dense op."""

    name = "shapes"

    def __init__(self):
        super().__init__()
        self.shapes = []

    def attention(self, q, k, v, call):
        self.shapes.append((tuple(q.shape), call.heads, call.q_len, call.text_len))
        return call.run_dense()


def _close(outs, refs, what):
    for step, (a, b) in enumerate(zip(outs, refs)):
        torch.testing.assert_close(
            a, b, atol=2e-5, rtol=1e-4, msg=lambda m, step=step: f"{what}, step {step}: {m}"
        )


def _same_stats(stats, ref, what):
    assert [(r["step"], r["layer"], r["kind"]) for r in stats.records] == [
        (r["step"], r["layer"], r["kind"]) for r in ref.records
    ], what
    for a, b in zip(stats.records, ref.records):
        assert math.isclose(a["density"], b["density"], rel_tol=1e-6), (what, a, b)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        assert dist.get_world_size() == WORLD
        report = {"world": dist.get_world_size(), "wan": {}}

        # Wan: dit_accel applied after enable_parallelism
        x = _wan_inputs()
        ref_model, cp_model = _wan4(), _wan4()
        _enable_ulysses(cp_model)
        _close(_run(cp_model, x, 1), _run(ref_model, x, 1), "stock Ulysses vs one process")
        spy = _Shapes()
        dit_accel.apply(cp_model, method=spy)
        _close(_run(cp_model, x, 1), _run(ref_model, x, 1), "dit_accel dense under Ulysses")
        assert {s[0] for s in spy.shapes} == {(1, 256, 2, 12)}, spy.shapes  # every token, 2 of 4 heads
        dit_accel.remove(cp_model)
        for name, knobs in WAN_METHODS:
            handle = dit_accel.apply(ref_model, method=name, **COMMON, **knobs)
            ref = _run(ref_model, x)
            ref_stats = handle.stats()
            dit_accel.remove(ref_model)
            handle = dit_accel.apply(cp_model, method=name, **COMMON, **knobs)
            out = _run(cp_model, x)
            stats = handle.stats(all_ranks=True)
            local = handle.stats()
            dit_accel.remove(cp_model)
            _close(out, ref, f"wan {name}")
            _same_stats(stats, ref_stats, f"wan {name}")
            report["wan"][name] = {
                "kinds": [r["kind"] for r in stats.records],
                "density": [r["density"] for r in stats.records],
                "local_density": [r["density"] for r in local.records],
                "memory_ranks": stats.memory.get("ranks"),
            }

        # Wan: dit_accel applied before enable_parallelism (the tracker sees the whole input either way)
        ref_model, cp_model = _wan4(), _wan4()
        knobs = dict(WAN_METHODS[1][1])
        dit_accel.apply(ref_model, method="window", **COMMON, **knobs)
        handle = dit_accel.apply(cp_model, method="window", **COMMON, **knobs)
        _enable_ulysses(cp_model)
        _close(_run(cp_model, x, 3), _run(ref_model, x, 3), "wan window, applied first")

        # Flux: text first, single blocks without a text length, dit_accel applied first (the step tracker
        # gathers the inputs diffusers' top-level split hook shards)
        fx = _flux_inputs()
        ref_model, cp_model = _flux(), _flux()
        knobs = {"density": 0.5, "dense_steps": 1, **COMMON}
        ref_handle = dit_accel.apply(ref_model, method="window", **knobs)
        handle = dit_accel.apply(cp_model, method="window", **knobs)
        _enable_ulysses(cp_model)
        _close(_run(cp_model, fx, 3), _run(ref_model, fx, 3), "flux window")
        stats = handle.stats(all_ranks=True)
        _same_stats(stats, ref_handle.stats(), "flux window")
        report["flux"] = {"kinds": [r["kind"] for r in stats.records], "tracker_grid": handle.tracker._grid}

        # Flux under regional torch.compile: the exchange and the regrouping trace into the blocks' graphs
        handle.reset()
        torch._dynamo.reset()
        cp_model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            _close(_run(cp_model, fx, 3), _run(ref_model, fx, 3), "flux window, compiled blocks")
        _same_stats(handle.stats(all_ranks=True), ref_handle.stats(), "flux window, compiled blocks")

        # Qwen-Image: text first, sharded inside the model (transformer_blocks.0)
        qx = _qwen_inputs()
        ref_model, cp_model = _qwen(), _qwen()
        ref_handle = dit_accel.apply(ref_model, method="window", **knobs)
        _enable_ulysses(cp_model)
        handle = dit_accel.apply(cp_model, method="window", **knobs)
        _close(_run(cp_model, qx, 3), _run(ref_model, qx, 3), "qwenimage window")
        stats = handle.stats(all_ranks=True)
        _same_stats(stats, ref_handle.stats(), "qwenimage window")
        report["qwenimage"] = {"kinds": [r["kind"] for r in stats.records]}
        if rank == 0:
            with open(os.path.join(out_dir, "report.json"), "w") as f:
                json.dump(report, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_ulysses_equals_one_process(tmp_path):
    threads = torch.get_num_threads()
    try:
        mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world"] == WORLD
    assert sorted(report["wan"]) == sorted(name for name, _ in WAN_METHODS)
    for name, row in report["wan"].items():
        assert row["memory_ranks"] in (None, WORLD) or name == "dense"
        assert all(0 < d <= 1 for d in row["density"]), (name, row)
        if name != "dense":
            assert min(row["density"]) < 1, (name, row)
    assert {"fused_search", "cached_search", "sparse"} <= set(report["wan"]["adaspa"]["kinds"])
    assert {"refresh", "corrected"} & set(report["wan"]["rettention"]["kinds"])
    for family in ("flux", "qwenimage"):
        assert "sparse" in report[family]["kinds"], (family, report[family])


def test_bench_parallel_smoke_two_processes(tmp_path):
    """benchmarks/bench_parallel.py on the CPU: two processes (torchrun, gloo), 1 and 2 ranks, every row's
    2-rank outputs checked against its 1-rank outputs."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_parallel.py"
    out = tmp_path / "parallel.json"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    rows = "stock,dense,window_0.1,adaspa_0.8_uniform"
    proc = subprocess.run(
        [*launch, str(script), "--smoke", "--steps", "4", "--rows", rows, "--out", str(out)],
        cwd=tmp_path,  # not the repository root, whose kernels/ folder diffusers would import
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["world_size"] == WORLD and list(result["rows"]) == rows.split(",")
    for name, row in result["rows"].items():
        assert row["check"]["ok"], (name, row)
        assert row["gpus_1"]["estimate_s"] > 0 and row["gpus_2"]["estimate_s"] > 0, (name, row)
        assert row["speedup"]["cp"] > 0, (name, row)
    assert set(result["rows"]["adaspa_0.8_uniform"]["gpus_2"]["forward_ms"]) == {
        "dense", "fused_search", "sparse", "cached_search",
    }  # fmt: skip
