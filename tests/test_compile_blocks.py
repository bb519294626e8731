"""Regional compilation of wrapped pipelines (``compile_blocks``, ``AcceleratedPipeline.compile``): the blocks
are compiled once, renders match the eager ones, steps do not recompile, and ``remove`` keeps the compiled
blocks running stock attention (CPU, tiny pipelines, the aot_eager backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_pipes import PIPELINES

from dit_accel.pipelines import wrapped
from dit_accel.pipelines.quality import render_output

BLOCKS = {"block_q": 16, "block_k": 16}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def _build(name):
    pipe, call = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe, call


def _compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def test_wan_compiled_blocks_match_eager_without_recompiling():
    pipe, call = _build("wan")
    accel = wrapped.wrap(pipe, "balanced", **BLOCKS)
    eager = render_output(accel, **call, seed=0)
    eager_kinds = [r["kind"] for r in accel.stats().records]

    assert accel.compile(backend="aot_eager", fullgraph=True) is accel
    blocks = pipe.transformer.blocks
    assert all(_compiled(b) for b in blocks) and not _compiled(pipe.transformer)
    assert wrapped.compile_blocks(pipe, backend="aot_eager") == 0  # already compiled: nothing more

    torch._dynamo.utils.counters.clear()
    compiled = render_output(accel, **call, seed=0)  # first call: compiles
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = render_output(accel, **call, seed=0)  # every step, layer and CFG context: no recompile
    np.testing.assert_allclose(compiled, eager, atol=2e-3)
    np.testing.assert_array_equal(again, compiled)
    assert [r["kind"] for r in accel.stats().records] == eager_kinds  # the method ran its schedule

    accel.configure(preset="fast")  # re-applied processors: same compiled blocks
    assert all(_compiled(b) for b in blocks)
    stock_pipe = accel.remove()
    assert all(_compiled(b) for b in blocks)  # the compilation belongs to the pipeline
    stock_compiled = render_output(stock_pipe, **call, seed=0)
    for b in blocks:
        b._compiled_call_impl = None
    stock_eager = render_output(stock_pipe, **call, seed=0)
    np.testing.assert_allclose(stock_compiled, stock_eager, atol=2e-3)


def test_blocks_of_a_model_without_repeated_blocks():
    """PixArt declares no ``_repeated_blocks`` (diffusers 0.42): the elements of its block list compile."""
    pipe, call = _build("pixart")
    assert not getattr(type(pipe.transformer), "_repeated_blocks", None)
    accel = wrapped.wrap(pipe, "balanced", **BLOCKS)
    eager = render_output(accel, **call, seed=0)
    n = wrapped.compile_blocks(pipe, backend="aot_eager")
    assert n == len(pipe.transformer.transformer_blocks) >= 2
    torch._dynamo.utils.counters.clear()
    np.testing.assert_allclose(render_output(accel, **call, seed=0), eager, atol=2e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def test_nothing_to_compile_is_an_error():
    with pytest.raises(ValueError, match="no repeated blocks"):
        wrapped.compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_fused_blocks_under_compile_run_the_stock_block_without_graph_breaks(monkeypatch):
    """With fuse_blocks the compiled blocks trace the stock forward beneath the hook (inductor fuses it):
    fullgraph holds and the fused steps never run inside the graph."""
    from dit_accel.processors import wan as wan_processors

    steps = []
    real = wan_processors.block_step
    monkeypatch.setattr(wan_processors, "block_step", lambda *a, **k: steps.append(1) or real(*a, **k))
    pipe, call = _build("wan")
    accel = wrapped.wrap(pipe, "balanced", fuse_blocks=True, **BLOCKS)
    eager = render_output(accel, **call, seed=0)
    assert steps, "the fused block forward never ran eagerly"
    accel.compile(backend="aot_eager", fullgraph=True)
    steps.clear()
    compiled = render_output(accel, **call, seed=0)
    assert not steps
    np.testing.assert_allclose(compiled, eager, atol=2e-3)
