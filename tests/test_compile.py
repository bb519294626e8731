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


def _non_prefix(inputs):
    """The inputs with a hole in the first row's text mask: no key-length prefix expresses it."""
    key = next(k for k in inputs if k.endswith("_mask"))
    mask = inputs[key].clone()
    mask[0, 1] = False
    return {**inputs, key: mask}


@pytest.mark.parametrize("family", ["hunyuan_video", "mochi", "qwenimage"])
@pytest.mark.parametrize("holes", [False, True], ids=["prefix", "holes"])
def test_regional_compile_padded_text_without_graph_breaks(family, holes):
    """Families that pad their text pass a boolean key mask: deciding whether it is a prefix of each row
    (kv_len) reads it on the host, which under compile happens inside the opaque attention op, so no block
    breaks its graph; a mask with holes runs as eager runs it."""
    model, inputs = TRANSFORMERS[family]()
    x = inputs(2)  # the first row's text is padded
    if holes:
        x = _non_prefix(x)
    handle = dit_accel.apply(model, backend="torch", **BLOCKS, **KNOBS["rettention"])
    eager = _steps(model, x, n=4)
    eager_kinds = [(r["step"], r["layer"], r["kind"]) for r in handle.stats().records]
    handle = dit_accel.apply(model, backend="torch", **BLOCKS, **KNOBS["rettention"])
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    else:  # Mochi declares none (diffusers 0.42); its last block (no text output) is built differently
        for block in model.transformer_blocks:
            if not block.context_pre_only:
                block.compile(fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = _steps(model, x, n=4)
    assert [(r["step"], r["layer"], r["kind"]) for r in handle.stats().records] == eager_kinds
    for a, b in zip(outs, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dit_accel.remove(model)


def _family_steps(model, x, n=4):
    """``n`` denoising steps; SD3 and PixArt have no cache_context, so their steps come from the timestep."""
    if hasattr(model, "cache_context"):
        return _steps(model, x, n)
    outs = []
    for i in range(n):
        with torch.no_grad():
            t = torch.full_like(x["timestep"], 900.0 - 200.0 * i)
            outs.append(model(**{**x, "timestep": t}, return_dict=False)[0])
    return outs


@pytest.mark.parametrize("method", ["adaspa", "rettention"])
@pytest.mark.parametrize("family", list(TRANSFORMERS))
def test_compiled_blocks_of_every_family(family, method):
    """Every family's blocks compile with ``fullgraph=True`` (a graph break raises) through the methods that
    search and keep state, and give eager's outputs and schedule."""
    from dit_accel.pipelines.wrapped import compile_blocks

    model, inputs = TRANSFORMERS[family]()
    x = inputs(2)
    handle = dit_accel.apply(model, backend="torch", **BLOCKS, **KNOBS[method])
    eager = _family_steps(model, x)
    eager_kinds = [(r["step"], r["layer"], r["kind"]) for r in handle.stats().records]
    handle = dit_accel.apply(model, backend="torch", **BLOCKS, **KNOBS[method])
    assert compile_blocks(model, fullgraph=True, backend="aot_eager") >= 1
    outs = _family_steps(model, x)
    assert [(r["step"], r["layer"], r["kind"]) for r in handle.stats().records] == eager_kinds
    for a, b in zip(outs, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    dit_accel.remove(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (inductor, cuDNN)")
@pytest.mark.parametrize("family", ["hunyuan_video", "mochi", "qwenimage"])
@pytest.mark.parametrize("holes", [False, True], ids=["prefix", "holes"])
def test_gpu_compiled_padded_text(family, holes):
    """On CUDA in bf16 with inductor: the key mask read inside the attention op (where
    ``dense_backend="auto"`` runs cuDNN on the valid key prefix) compiles with no graph break and matches
    eager."""
    model, inputs = TRANSFORMERS[family]()
    model = model.to("cuda", torch.bfloat16)
    x = {
        k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda"))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in (_non_prefix(inputs(2)) if holes else inputs(2)).items()
    }
    knobs = {**KNOBS["rettention"], "dense_backend": "auto"}
    handle = dit_accel.apply(model, **BLOCKS, **knobs)
    eager = _steps(model, x, n=4)
    eager_kinds = [(r["step"], r["layer"], r["kind"]) for r in handle.stats().records]
    handle = dit_accel.apply(model, **BLOCKS, **knobs)
    for block in model.transformer_blocks:
        if not getattr(block, "context_pre_only", False):  # Mochi's last block is built differently
            block.compile(fullgraph=True)
    outs = _steps(model, x, n=4)
    assert [(r["step"], r["layer"], r["kind"]) for r in handle.stats().records] == eager_kinds
    for a, b in zip(outs, eager):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    dit_accel.remove(model)
