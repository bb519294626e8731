"""Every family's processors against the stock diffusers processors on tiny transformers (batch 2).

Dense method: bit-exact. A full-density plan through the sparse path: equal to dense within fp32 rounding.
``remove``: stock outputs and objects back. What the method sees (sequence, text, padding) per family, and
that padded text stays invisible on the sparse path.
"""

import pytest
import torch
from _tiny import TRANSFORMERS, Recorder

import dit_accel
from dit_accel.kernels import BlockPlan

FAMILIES = list(TRANSFORMERS)

# family -> {layer-name fragment: (q_len, text_len, text_position, kv_len, layout)} for the batch-2 inputs
EXPECTED_CALLS = {
    "wan": {"attn1": (45, 0, None, None, "bshd")},
    "hunyuan_video": {
        ".transformer_blocks.": (67, 7, "last", [64, 67], "bshd"),
        ".single_transformer_blocks.": (67, 7, "last", [64, 67], "bshd"),
    },
    "cogvideox": {"attn1": (52, 7, "first", None, "bhsd")},
    "ltx": {"attn1": (60, 0, None, None, "bshd")},
    "mochi": {"attn1": (67, 7, "last", [64, 67], "bhsd")},
    "flux": {
        ".transformer_blocks.": (51, 9, "first", None, "bshd"),
        ".single_transformer_blocks.": (51, 9, "first", None, "bshd"),
    },
    "sd3": {".attn": (51, 9, "last", None, "bhsd"), ".attn2": (42, 0, None, None, "bhsd")},
    "pixart": {"attn1": (42, 0, None, None, "bhsd")},
    "qwenimage": {".attn": (51, 9, "last", [48, 51], "bshd")},
}
EXPECTED_GRID = {
    "wan": (3, 3, 5),
    "hunyuan_video": (3, 4, 5),
    "cogvideox": (3, 3, 5),
    "ltx": (3, 4, 5),
    "mochi": (3, 4, 5),
    "flux": (1, 6, 7),
    "sd3": (1, 6, 7),
    "pixart": (1, 6, 7),
    "qwenimage": (1, 6, 7),
}
PADDED_TEXT = {
    "hunyuan_video": "encoder_attention_mask",
    "mochi": "encoder_attention_mask",
    "qwenimage": "encoder_hidden_states_mask",
}


def _forward(model, x):
    with torch.no_grad():
        return model(**x, return_dict=False)[0]


@pytest.fixture(params=[pytest.param(f, id=f) for f in FAMILIES])
def family(request):
    model, inputs = TRANSFORMERS[request.param]()
    return request.param, model, inputs(2)


def _stock_processors(model):
    return {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}


def test_dense_method_is_bit_exact(family):
    name, model, x = family
    ref = _forward(model, x)
    handle = dit_accel.apply(model, method="dense")
    out = _forward(model, x)
    assert torch.equal(out, ref), f"{name}: max diff {(out - ref).abs().max():.3e}"
    records = handle.stats().records
    assert records and {r["kind"] for r in records} == {"dense"}
    assert len(records) == len(handle.layers)


class FullPlan(dit_accel.SparseMethod):
    """Every block through the sparse kernel path (window at density 1 runs the stock op instead)."""

    def plan_for(self, q, k, call):
        return BlockPlan.dense(call.q_len, call.k_len, call.block_q, call.block_k, device=q.device)


def test_full_density_plan_equals_dense(family):
    name, model, x = family
    ref = _forward(model, x)
    handle = dit_accel.apply(model, method=FullPlan(), block_q=16, block_k=16)
    out = _forward(model, x)
    records = handle.stats().records
    assert {(r["kind"], r["density"]) for r in records} == {("sparse", 1.0)}
    assert len(records) == len(handle.layers)
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{name}: max diff {err:.3e}"


def test_sparse_plan_changes_output_and_remove_restores_stock(family):
    name, model, x = family
    ref = _forward(model, x)
    stock = _stock_processors(model)
    handle = dit_accel.apply(model, method="window", density=0.25, block_q=16, block_k=16)
    out = _forward(model, x)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-4, f"{name}: a sparse plan left the output unchanged"
    densities = {r["density"] for r in handle.stats().records}
    assert all(0.0 < d < 1.0 for d in densities), densities
    assert dit_accel.remove(model)
    assert _stock_processors(model) == stock
    assert all(a is b for a, b in zip(_stock_processors(model).values(), stock.values()))
    assert torch.equal(_forward(model, x), ref)


def test_what_the_method_sees(family):
    name, model, x = family
    rec = Recorder()
    handle = dit_accel.apply(model, method=rec)
    _forward(model, x)
    assert len(rec.calls) == len(handle.layers) > 0
    for call in rec.calls:
        matches = [v for k, v in EXPECTED_CALLS[name].items() if k in call["layer"]]
        assert matches, f"{name}: unexpected layer {call['layer']}"
        got = (call["q_len"], call["text_len"], call["text_position"], call["kv_len"], call["layout"])
        assert got == matches[-1], f"{name} {call['layer']}: {got} != {matches[-1]}"
        assert call["grid"] == EXPECTED_GRID[name]
        assert call["batch"] == 2 and call["step"] == 0 and call["context"] == "default"


@pytest.mark.parametrize("name", [pytest.param(f, id=f) for f in PADDED_TEXT])
def test_padded_text_is_invisible_on_the_sparse_path(name):
    model, inputs = TRANSFORMERS[name]()
    x = inputs(2)
    pad = ~x[PADDED_TEXT[name]][0].bool()
    assert pad.any() and not pad.all()

    def perturbed(where):
        y = dict(x)
        text = x["encoder_hidden_states"].clone()
        text[0, where] += 10.0 * torch.randn_like(text[0, where])
        y["encoder_hidden_states"] = text
        return y

    dit_accel.apply(model, method="window", density=0.5, block_q=16, block_k=16)
    a, b, c = _forward(model, x), _forward(model, perturbed(pad)), _forward(model, perturbed(~pad))
    assert torch.allclose(a[0], b[0], atol=1e-5, rtol=0), f"{name}: padded text changed sample 0"
    assert not torch.allclose(a[0], c[0], atol=1e-3), f"{name}: valid text had no effect"


@pytest.mark.parametrize("name", [pytest.param(f, id=f) for f in PADDED_TEXT])
@pytest.mark.parametrize("method", ["dense", "full_plan"])
def test_text_mask_with_holes_matches_stock(name, method):
    """A text mask that no key-length prefix expresses (a hole in the first row): the dense method and a
    density-1 sparse plan both give stock's output (stock attention for the call, or the valid tokens
    gathered first, as the family's stock processor orders them)."""
    model, inputs = TRANSFORMERS[name]()
    x = inputs(2)
    mask = x[PADDED_TEXT[name]].clone()
    mask[0, 1] = False
    x[PADDED_TEXT[name]] = mask
    ref = _forward(model, x)
    dit_accel.apply(model, method="dense" if method == "dense" else FullPlan(), block_q=16, block_k=16)
    out = _forward(model, x)
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{name}: max diff {err:.3e}"


@pytest.mark.parametrize("name", [pytest.param(f, id=f) for f in ("wan", "flux", "cogvideox")])
def test_fused_qkv_projections(name):
    model, inputs = TRANSFORMERS[name]()
    x = inputs(2)
    model.fuse_qkv_projections()
    ref = _forward(model, x)
    dit_accel.apply(model, method="dense")
    assert torch.equal(_forward(model, x), ref)
    dit_accel.apply(model, method="window", density=1.0, block_q=16, block_k=16)
    assert torch.allclose(_forward(model, x), ref, atol=1e-5, rtol=0)


def test_flux_lora_scale():
    peft = pytest.importorskip("peft")
    model, inputs = TRANSFORMERS["flux"]()
    x = inputs(1)
    config = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    model.add_adapter(config)
    x["joint_attention_kwargs"] = {"scale": 0.5}
    ref = _forward(model, x)
    dit_accel.apply(model, method="dense")
    assert torch.equal(_forward(model, x), ref)


ROTARY_FAMILIES = {"wan": "wan", "hunyuan_video": "apply_rotary_emb", "flux": "apply_rotary_emb",
                   "cogvideox": "apply_rotary_emb"}  # fmt: skip


@pytest.mark.parametrize("name", list(ROTARY_FAMILIES))
def test_fused_rotary_step_is_bit_exact_with_the_stock_processor(name, monkeypatch):
    """The rotary step each of these processors hands to ``kernels.rotary_interleaved`` (on CUDA): forced onto
    the Triton kernel (Triton's interpreter here, float16, where it rounds exactly), the dense method still
    equals the stock model bit for bit, so the views, the text tokens left unrotated and the write-back are
    right."""
    from dit_accel.processors import base

    model, inputs = TRANSFORMERS[name]()
    model = model.half()
    x = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs(2).items()}
    if name == "cogvideox":  # its pipeline, not the model, makes the tables: 3 x 3 x 5 video tokens, dim 8
        angle = torch.randn(45, 4, generator=torch.Generator().manual_seed(0)).repeat_interleave(2, -1)
        x["image_rotary_emb"] = (angle.cos(), angle.sin())
    ref = _forward(model, x)
    seen = []

    def on_triton(q, k, cos, sin, backend, **kwargs):
        seen.append((kwargs["convention"], q.shape[1], kwargs["rotary_len"]))
        return base_rotary(q, k, cos, sin, "triton", **kwargs)

    base_rotary = base.rotary_interleaved
    monkeypatch.setattr(base, "rotary_interleaved", on_triton)
    dit_accel.apply(model, method="dense")
    out = _forward(model, x)
    assert seen and {c for c, _, _ in seen} == {ROTARY_FAMILIES[name]}
    if name == "hunyuan_video":  # single-stream blocks rotate the video tokens and copy the text after them
        assert any(rot is not None and rot < seq for _, seq, rot in seen)
    assert torch.equal(out, ref), f"{name}: max diff {(out - ref).abs().max():.3e}"
