"""Dense attention backends: the measured table behind ``backend="auto"``, explicit backends, the xformers
backend (where installed), and ``SparseAttentionConfig.dense_backend`` in the methods (the stock default
stays bit-exact; stats and ``remove()`` are unaffected)."""

import ast
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from _tiny import TRANSFORMERS

import dit_accel
from dit_accel.kernels import dense_attention, ops
from dit_accel.kernels import xformers_attention as xa
from dit_accel.kernels.reference import attention_reference
from dit_accel.methods import SparseMethod

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
needs_xformers = pytest.mark.skipif(
    not HAS_XFORMERS, reason="xformers is not installed (pip install 'dit-accel[xformers]')"
)


def _qkv(b, s, h, d, dtype=torch.float16, layout="bshd", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
    return tuple(torch.randn(shape, generator=g).to(dtype).to(DEVICE) for _ in range(3))


def _bhsd(x, layout):
    return x.transpose(1, 2) if layout == "bshd" else x


# --------------------------------------------------------------------------------------------------
# The auto table: every row backed by a committed measurement, its first choice the measured fastest
# --------------------------------------------------------------------------------------------------
def _measurements():
    """{table key: [(config, [backends, fastest first])]} from the committed H200 results.

    bench_dense.py's JSON (dense_<gpu>.json) supersedes the dense columns of bench_kernels.py's
    (kernels_<gpu>.json) for the same GPU.
    """
    found: dict[tuple, list] = {}
    dense = [
        p
        for p in sorted(RESULTS.glob("dense_*.json"))
        if json.loads(p.read_text())["benchmark"] == "bench_dense"
    ]
    for path in dense:
        report = json.loads(path.read_text())
        major = report["capability"][0]
        for c in report["configs"]:
            for tag, lse in (("no_lse", False), ("lse", True)):
                key = ops._dense_table_key(major, c["D"], c["S"], lse, c.get("kv_len") is not None)
                found.setdefault(key, []).append((c["config"], c["measured_order"][tag]))
    if not any(p.name == "dense_nvidia_h200.json" for p in dense):
        report = json.loads((RESULTS / "kernels_nvidia_h200.json").read_text())
        assert report["gpu"] == "NVIDIA H200"
        for c in report["configs"]:
            assert c["dense_attention_triton_err"] < 2e-2 and c["dense_attention_cudnn_err"] < 2e-2
            times = {
                False: {"cudnn": c["cudnn_ms"], "triton": c["dense_attention_triton_ms"]},
                True: {"cudnn": c["dense_attention_cudnn_ms"], "triton": c["dense_attention_triton_ms"]},
            }
            for lse, t in times.items():
                key = ops._dense_table_key(9, c["D"], c["S"], lse, False)
                found.setdefault(key, []).append((c["config"], sorted(t, key=t.get)))
    return found


def test_every_table_row_is_measured_and_leads_with_the_measured_fastest():
    measured = _measurements()
    assert set(ops._DENSE_TABLE) <= set(measured), "a table row without a measurement behind it"
    for key, order in ops._DENSE_TABLE.items():
        assert order and len(set(order)) == len(order)
        assert set(order) <= {"cudnn", "xformers", "triton"}, (key, order)
        for config, fastest_first in measured[key]:
            assert order[0] == fastest_first[0], f"{key}: {config} measured {fastest_first}, table {order}"
            assert set(order) <= set(fastest_first), f"{key}: {config} did not time {order}"


@pytest.mark.parametrize(
    "key,expected",
    [
        pytest.param((9, 128, 32760, True, False), ("cudnn", "triton"), id="h200-d128-long-lse"),
        pytest.param((9, 128, 4608, False, False), ("cudnn", "triton"), id="h200-d128-short"),
        pytest.param((9, 72, 16384, False, False), ("cudnn", "triton"), id="h200-d72"),
        pytest.param((9, 64, 17776, True, False), ("triton", "cudnn"), id="h200-d64-lse"),
        pytest.param((9, 64, 4096, True, False), (), id="h200-d64-short-unmeasured"),
        pytest.param((9, 128, 32760, True, True), ("cudnn", "triton"), id="h200-d128-kv_len"),
        pytest.param((9, 64, 32760, True, True), (), id="d64-kv_len-unmeasured"),
        pytest.param((9, 256, 32760, True, False), (), id="d256-unmeasured"),
        pytest.param((8, 128, 32760, True, False), (), id="other-device-unmeasured"),
    ],
)
def test_auto_order_by_key(key, expected):
    assert ops._dense_auto_order(*key) == expected


def test_auto_takes_the_next_measured_choice_and_logs_why(caplog):
    reasons = {"xformers": "xformers could not be imported (test)", "cudnn": "head_dim 120"}
    with caplog.at_level(logging.INFO, logger="dit_accel"):
        chosen = ops._first_runnable(("xformers", "cudnn", "triton"), reasons.get)
    assert chosen == "triton"
    assert "auto skips 'xformers'" in caplog.text and "could not be imported (test)" in caplog.text
    assert "auto skips 'cudnn'" in caplog.text and "head_dim 120" in caplog.text
    assert ops._first_runnable(("cudnn",), reasons.get) is None
    assert ops._first_runnable((), reasons.get) is None


def test_auto_without_a_table_row_runs_our_kernel():
    q, k, v = _qkv(1, 40, 2, 32)
    out, lse = dense_attention(q, k, v)
    ref, ref_lse = dense_attention(q, k, v, backend="triton" if ops._interpret() else "torch")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# Explicit backends and return_lse
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(DEVICE == "cuda", reason="checks the refusals off CUDA")
def test_explicit_backends_never_fall_back():
    q, k, v = _qkv(1, 40, 2, 32)
    with pytest.raises(RuntimeError, match="backend='cudnn' cannot run: tensors are on cpu"):
        dense_attention(q, k, v, backend="cudnn")
    with pytest.raises(RuntimeError, match="backend='xformers' cannot run"):
        dense_attention(q, k, v, backend="xformers", return_lse=False)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run: dtype torch.float32"):
        dense_attention(q.float(), k.float(), v.float(), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        dense_attention(q, k, v, backend="flash")


def test_xformers_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(xa, "_fmha", lambda: (None, "xformers could not be imported (ModuleNotFoundError)"))
    q, k, v = _qkv(1, 40, 2, 32)
    with pytest.raises(RuntimeError, match="backend='xformers' cannot run: xformers could not be imported"):
        dense_attention(q, k, v, backend="xformers")
    assert xa.unavailable_reason(*(_bhsd(x, "bshd") for x in (q, k, v)), None, 0.1, True).startswith(
        "xformers could not be imported"
    )
    assert xa.version() is None and xa.fw_op_name(q, k, v, 0.1, True) is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_return_lse_false_returns_the_same_output(backend, layout):
    if backend == "triton" and ops._triton_unavailable_reason(torch.empty(1, dtype=torch.float16)):
        pytest.skip("Triton cannot run here (no CUDA and TRITON_INTERPRET unset)")
    q, k, v = _qkv(2, 37, 2, 24, layout=layout, seed=3)
    out, lse = dense_attention(q, k, v, layout=layout, backend=backend)
    only = dense_attention(q, k, v, layout=layout, backend=backend, return_lse=False)
    assert isinstance(only, torch.Tensor) and only.shape == q.shape
    torch.testing.assert_close(only, out, atol=0, rtol=0)
    assert lse.shape == (2, 2, 37) and lse.dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# xformers: imported only by its own module; its paths where it is installed
# --------------------------------------------------------------------------------------------------
def test_only_the_xformers_module_imports_xformers_and_only_lazily():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        in_functions = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            if any(n.split(".")[0] == "xformers" for n in names):
                assert path.name == "xformers_attention.py", f"{path.name} imports xformers"
                assert id(node) in in_functions, f"{path.name} imports xformers at module level"


@needs_xformers
@pytest.mark.skipif(DEVICE == "cuda", reason="checks the reasons off CUDA")
def test_xformers_reasons_off_cuda():
    q, k, v = (x.transpose(1, 2) for x in _qkv(1, 40, 2, 32))
    assert "need CUDA" in xa.unavailable_reason(q, k, v, None, 0.1, True)
    op, tried = xa._dispatch(q, k, v, 0.1, True)  # the fmha internals this module mirrors still fit
    assert op is None and tried and all(isinstance(r, list) and r for r in tried.values())
    assert xa.fw_op_name(q, k, v, 0.1, True) is None
    assert xa.version() == importlib.import_module("xformers").__version__


@pytest.mark.gpu
@needs_xformers
@pytest.mark.parametrize("s,d,layout", [(4099, 128, "bshd"), (3001, 72, "bhsd"), (2048, 64, "bshd")])
def test_gpu_xformers_matches_the_reference(s, d, layout):
    q, k, v = _qkv(2, s, 4, d, torch.bfloat16, layout, seed=11)
    qh, kh, vh = (_bhsd(x, layout) for x in (q, k, v))
    reason = xa.unavailable_reason(qh, kh, vh, None, d**-0.5, True)
    if reason is not None:
        pytest.skip(f"xformers cannot run here: {reason}")
    ref, ref_lse = attention_reference(qh, kh, vh, None, d**-0.5)
    out, lse = dense_attention(q, k, v, layout=layout, backend="xformers")
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 4, s)
    err = (_bhsd(out, layout).float() - ref.float()).norm() / ref.float().norm()
    assert err < 1e-2, f"out rel err {err:.2e}"
    assert (lse - ref_lse).abs().max() < 1e-2
    only = dense_attention(q, k, v, layout=layout, backend="xformers", return_lse=False)
    torch.testing.assert_close(only, out, atol=1e-2, rtol=1e-2)
    kv_len = torch.tensor([s, s // 2], device=DEVICE)
    with pytest.raises(RuntimeError, match="kv_len"):
        dense_attention(q, k, v, layout=layout, backend="xformers", kv_len=kv_len)


@pytest.mark.parametrize("lengths", [[40, 40], [40, 23], [0, 17], [0, 0], [99, 5]])
@pytest.mark.parametrize("lse", [False, True])
def test_cudnn_kv_len_runs_on_the_valid_key_prefix(monkeypatch, lengths, lse):
    """cuDNN has no kv_len: dense_attention slices each batch element's keys to its valid prefix (one call
    when the lengths agree). The cuDNN call itself is replaced by the reference, which sees no kv_len: any
    key past the prefix that reached it would change the output."""
    calls = []

    def fake_cudnn(qh, kh, vh, scale, return_lse):
        calls.append(kh.shape[2])
        out, lse_ = attention_reference(qh, kh, vh, None, scale)
        return out.to(qh.dtype), (lse_ if return_lse else None)

    monkeypatch.setattr(ops, "_cudnn_call", fake_cudnn)
    monkeypatch.setattr(ops, "_cudnn_unavailable_reason", lambda qh, kv_len: None)
    q, k, v = _qkv(2, 40, 3, 32, seed=4)
    kv_len = torch.tensor(lengths)
    res = dense_attention(q, k, v, backend="cudnn", kv_len=kv_len, return_lse=lse)
    ref, ref_lse = dense_attention(q, k, v, backend="torch", kv_len=kv_len)
    out = res[0] if lse else res
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    if lse:
        torch.testing.assert_close(res[1], ref_lse, atol=1e-4, rtol=1e-4)
    valid = [min(n, 40) for n in lengths]
    assert calls == ([valid[0]] if len(set(valid)) == 1 and valid[0] > 0 else [n for n in valid if n > 0])


@pytest.mark.gpu
@pytest.mark.parametrize("lse", [False, True])
def test_gpu_cudnn_kv_len_matches_the_reference(lse):
    q, k, v = _qkv(2, 3001, 4, 128, torch.bfloat16, seed=6)
    kv_len = torch.tensor([2809, 1500], device=q.device)
    ref, ref_lse = dense_attention(q.float(), k.float(), v.float(), backend="torch", kv_len=kv_len)
    for backend in ("cudnn", "auto"):
        res = dense_attention(q, k, v, backend=backend, kv_len=kv_len, return_lse=lse)
        out = res[0] if lse else res
        err = (out.float() - ref).norm() / ref.norm()
        assert err < 1e-2, f"{backend}: out rel err {err:.2e}"
        if lse:
            assert (res[1] - ref_lse).abs().max() < 1e-2, backend


@pytest.mark.gpu
@pytest.mark.parametrize("lse", [False, True])
def test_gpu_cudnn_and_auto_match_the_reference(lse):
    q, k, v = _qkv(1, 3001, 4, 128, torch.bfloat16, seed=5)
    qh, kh, vh = (_bhsd(x, "bshd") for x in (q, k, v))
    ref, ref_lse = attention_reference(qh, kh, vh, None, 128**-0.5)
    for backend in ("cudnn", "auto", "triton"):
        res = dense_attention(q, k, v, backend=backend, return_lse=lse)
        out = res[0] if lse else res
        err = (_bhsd(out, "bshd").float() - ref.float()).norm() / ref.float().norm()
        assert err < 1e-2, f"{backend}: out rel err {err:.2e}"
        if lse:
            assert (res[1] - ref_lse).abs().max() < 1e-2, backend


# --------------------------------------------------------------------------------------------------
# SparseAttentionConfig.dense_backend in the methods
# --------------------------------------------------------------------------------------------------
def _forward(model, x):
    with torch.no_grad():
        return model(**x, return_dict=False)[0]


def test_config_dense_backend_values():
    assert dit_accel.SparseAttentionConfig().dense_backend == "stock"
    for name in ("stock", "auto", "cudnn", "xformers", "triton", "torch"):
        assert dit_accel.SparseAttentionConfig(dense_backend=name).dense_backend == name
    with pytest.raises(ValueError, match="dense_backend must be one of"):
        dit_accel.SparseAttentionConfig(dense_backend="flash")


@pytest.mark.parametrize("family", [pytest.param(f, id=f) for f in TRANSFORMERS])
def test_dense_backend_runs_dense_attention_in_every_family(family):
    model, inputs = TRANSFORMERS[family]()
    x = inputs(2)
    ref = _forward(model, x)
    stock = dit_accel.apply(model, method="dense", dense_backend="stock")
    assert torch.equal(_forward(model, x), ref)
    records = stock.stats().records
    handle = dit_accel.apply(model, method="dense", dense_backend="torch")
    out = _forward(model, x)
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), f"{family}: max diff {err:.3e}"
    assert [(r["layer"], r["kind"], r["density"]) for r in handle.stats().records] == [
        (r["layer"], r["kind"], r["density"]) for r in records
    ]
    assert {r["kind"] for r in records} == {"dense"}


def test_remove_restores_stock_after_a_dense_backend():
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    ref = _forward(model, x)
    before = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    handle = dit_accel.apply(model, method="dense", dense_backend="torch", timing=True)
    _forward(model, x)
    records = handle.stats().records
    assert len(records) == len(handle.layers) and {r["kind"] for r in records} == {"dense"}
    assert all(isinstance(r["time_ms"], float) and r["time_ms"] >= 0 for r in records)
    assert dit_accel.remove(model) is True
    after = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    assert after.keys() == before.keys() and all(after[n] is p for n, p in before.items())
    assert torch.equal(_forward(model, x), ref)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the refusal off CUDA")
def test_a_named_dense_backend_that_cannot_run_raises():
    model, inputs = TRANSFORMERS["wan"]()
    dit_accel.apply(model, method="dense", dense_backend="xformers")
    with pytest.raises(RuntimeError, match="backend='xformers' cannot run"):
        _forward(model, inputs(1))


class _SearchLike(SparseMethod):
    """Runs the dense pass with its LSE on every call, as a fused search does."""

    name = "search-like"

    def attention(self, q, k, v, call):
        out, lse = call.run_dense(return_lse=True)
        assert lse.dtype == torch.float32 and lse.shape == (call.batch, call.heads, call.q_len)
        return out


@pytest.mark.parametrize(
    "backend,dense_backend,expected",
    [
        pytest.param("torch", "stock", "torch", id="stock-takes-backend"),
        pytest.param("auto", "stock", "auto", id="stock-default"),
        pytest.param("torch", "auto", "auto", id="dense-backend-wins"),
    ],
)
def test_dense_passes_with_lse_use_the_configured_backend(monkeypatch, backend, dense_backend, expected):
    import dit_accel.methods.base as base

    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["backend"], kwargs["return_lse"]))
        return dense_attention(*args, **kwargs)

    monkeypatch.setattr(base, "dense_attention", spy)
    model, inputs = TRANSFORMERS["wan"]()
    x = inputs(1)
    dit_accel.apply(model, method=_SearchLike(), backend=backend, dense_backend=dense_backend)
    _forward(model, x)
    assert seen and set(seen) == {(expected, True)}
    seen.clear()
    dit_accel.apply(model, method="dense", backend=backend, dense_backend=dense_backend)
    _forward(model, x)
    if dense_backend == "stock":
        assert seen == []  # the stock op
    else:
        assert set(seen) == {(dense_backend, False)}


# --------------------------------------------------------------------------------------------------
# The benchmark script runs (CPU smoke mode), so it cannot rot
# --------------------------------------------------------------------------------------------------
def test_dense_benchmark_smoke(tmp_path, monkeypatch):
    from _bench import load_benchmark

    bench = load_benchmark("bench_dense", monkeypatch)
    out = tmp_path / "dense.json"
    report = bench.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert [c["config"] for c in report["configs"]] == list(bench.SMOKE_CONFIGS)
    assert report["xformers"]["available"] == (xa._fmha()[0] is not None)
    for c in report["configs"]:
        paths = c["paths"]
        for name in ("triton", "triton+lse", "torch+lse"):
            assert paths[name]["correct"] and paths[name]["ms"] > 0, (name, paths[name])
        assert paths["triton+lse"]["lse_err"] < 1e-2
        for name in ("cudnn", "cudnn+lse", "xformers", "xformers+lse"):
            assert not paths[name]["correct"] and "cannot run" in paths[name]["error"]
            assert "ms" not in paths[name]
        assert c["measured_order"] == {"no_lse": ["triton"], "lse": ["triton"]}
        assert c["auto"] == {"no_lse": "triton", "lse": "triton"}


@needs_xformers
@pytest.mark.parametrize("lse", [False, True])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_xformers_wrapper_layouts_and_lse_through_fmha(monkeypatch, layout, lse):
    """The calls into fmha's public API, with a CPU stand-in for the operator (fmha's kernels need CUDA):
    (B, S, H, D) views in, the output back in the caller's layout, the LSE cut from 32-row padding."""
    from xformers.ops.fmha.common import Context

    class PaddedLseOp:
        NAME = "padded-lse-test-op"

        @classmethod
        def not_supported_reasons(cls, inp):
            return []

        @classmethod
        def apply(cls, inp, needs_gradient):
            q, k, v = (x.transpose(1, 2).float() for x in (inp.query, inp.key, inp.value))  # fmha's layout
            s = q @ k.transpose(-1, -2) * inp.scale
            out = (s.softmax(-1) @ v).to(inp.query.dtype).transpose(1, 2).contiguous()
            pad = -q.shape[2] % 32
            lse = torch.nn.functional.pad(s.logsumexp(-1), (0, pad), value=float("inf"))
            return out, (Context(out=out, lse=lse) if needs_gradient else None)

    monkeypatch.setattr(xa, "_dispatch", lambda *a: (PaddedLseOp, {}))
    q, k, v = _qkv(2, 37, 3, 16, torch.float32, layout, seed=7)
    qh, kh, vh = (_bhsd(x, layout) for x in (q, k, v))
    out, out_lse = xa.xformers_attention(qh, kh, vh, 0.25, lse)
    ref, ref_lse = attention_reference(qh, kh, vh, None, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if lse:
        assert out_lse.shape == (2, 3, 37) and out_lse.is_contiguous()
        torch.testing.assert_close(out_lse, ref_lse, atol=1e-5, rtol=1e-5)
    else:
        assert out_lse is None
    empty, empty_lse = xa.xformers_attention(qh, kh[:, :, :0], vh[:, :, :0], 0.25, True)
    assert not empty.any() and bool((empty_lse == float("-inf")).all())
