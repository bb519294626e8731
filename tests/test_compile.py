"""torch.compile through dit_accel's processors (CPU, the aot_eager backend): no graph break in a whole-model
``fullgraph=True`` compile or a regional one, no recompilation across steps and layers, and the same outputs
and stats as eager."""

from __future__ import annotations

import pytest
import torch
from _tiny import TRANSFORMERS

import dit_accel

BLOCKS = {"block_q": 16, "block_k": 16}
KNOBS = {
    "dense": {"method": "dense"},
    "window": {"method": "window", "density": 0.5, "dense_steps": 1},
    "radial": {"method": "radial", "dense_steps": 1, "dense_layers": ()},
    "adaspa": {"method": "adaspa", "warmup": 1, "search_at": (3,)},
    "rettention": {
        "method": "rettention",
        "per_frame": False,
        "density": 0.5,
        "dense_steps": 1,
        "refresh_every": 2,
    },
}


def _steps(model, x, n=5):
    outs = []
    for i in range(n):
        with model.cache_context("cond", step_index=i, num_inference_steps=n), torch.no_grad():
            outs.append(model(**x, return_dict=False)[0])
    return outs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(KNOBS))
def test_fullgraph_whole_model(name):
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    handle = dit_accel.apply(model, backend="torch", **BLOCKS, **KNOBS[name])
    eager = _steps(model, x)
    eager_kinds = [(r["step"], r["layer"], r["kind"]) for r in handle.stats().records]
    handle = dit_accel.apply(model, backend="torch", **BLOCKS, **KNOBS[name])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = _steps(compiled, x)
    assert [(r["step"], r["layer"], r["kind"]) for r in handle.stats().records] == eager_kinds
    for a, b in zip(outs, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dit_accel.remove(model)


def test_regional_compile_shares_one_graph_across_layers():
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    handle = dit_accel.apply(model, backend="torch", **BLOCKS, **KNOBS["rettention"])
    eager = _steps(model, x)
    model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = _steps(model, x)
    kinds = {r["kind"] for r in handle.stats().records}
    assert {"dense", "refresh", "corrected"} <= kinds
    for a, b in zip(outs, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
