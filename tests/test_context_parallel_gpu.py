"""dit_accel under diffusers' context parallelism on GPUs (NCCL, one process per GPU, bf16, dit_accel's
kernels): the output under 2-way Ulysses (and 4- and 8-way where the GPUs exist) equals the single-GPU output
of the same method at every step to bf16 tolerance, for dense and each method, on a Wan transformer at a
14,040-token grid and on Flux (text first, single blocks); the stats gathered over the ranks equal the
single-GPU stats. Ring attention runs diffusers' ring attention (cuDNN backend) unchanged.

    python -m pytest -q -m gpu tests/test_context_parallel_gpu.py
"""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

STEPS = 6
# Wan at a 9 x 30 x 52 token grid (latent 9 x 60 x 104), 8 heads of 128, two layers: 14,040 tokens, 110 blocks
# of 128 per row; 7,020 / 3,510 / 1,755 tokens per rank at 2 / 4 / 8 ranks.
WAN = {
    "patch_size": (1, 2, 2), "num_attention_heads": 8, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 256, "freq_dim": 256, "ffn_dim": 2048, "num_layers": 2,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}  # fmt: skip
WAN_LATENT = (1, 16, 9, 60, 104)
# Flux at 64 x 64 image tokens + 512 text tokens (text first), 8 heads of 128, one dual and one single block.
FLUX = {
    "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 128,
    "num_attention_heads": 8, "joint_attention_dim": 256, "pooled_projection_dim": 64,
    "axes_dims_rope": [16, 56, 56],
}  # fmt: skip
FLUX_SIDE, FLUX_TEXT = 64, 512
METHODS = [
    ("dense", {}),
    ("window", {"density": 0.1, "dense_steps": 1}),
    ("radial", {"dense_steps": 1}),
    ("adaspa", {"sparsity": 0.8, "warmup": 1, "search_at": (3,), "head_adaptive": False}),
    ("rettention", {"density": 0.1, "dense_steps": 1, "refresh_every": 2}),
]
COMMON = {"block_q": 128, "block_k": 128, "backend": "auto"}
TOL = 2e-2  # relative L2 error, bf16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _build(cls, config: dict, device):
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**config)
    return model.eval().requires_grad_(False).to(torch.bfloat16)


def _wan_inputs(device):
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(WAN_LATENT, generator=g).to(device, torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, 64, WAN["text_dim"], generator=g).to(device, torch.bfloat16),
    }


def _flux_inputs(device):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(FLUX_SIDE, FLUX_SIDE, 3)
    ids[..., 1] = torch.arange(FLUX_SIDE)[:, None]
    ids[..., 2] = torch.arange(FLUX_SIDE)[None, :]
    bf16 = {"device": device, "dtype": torch.bfloat16}
    return {
        "hidden_states": torch.randn(1, FLUX_SIDE**2, FLUX["in_channels"], generator=g).to(**bf16),
        "encoder_hidden_states": torch.randn(1, FLUX_TEXT, FLUX["joint_attention_dim"], generator=g).to(
            **bf16
        ),
        "pooled_projections": torch.randn(1, FLUX["pooled_projection_dim"], generator=g).to(**bf16),
        "img_ids": ids.reshape(-1, 3).to(device),
        "txt_ids": torch.zeros(FLUX_TEXT, 3, device=device),
    }


def _run(model, x, steps=STEPS):
    outs = []
    for i in range(steps):
        t = torch.full(
            (x["hidden_states"].shape[0],), 1000.0 * (1 - i / steps), device=x["hidden_states"].device
        )
        with model.cache_context("cond", step_index=i, num_inference_steps=steps), torch.no_grad():
            outs.append(model(**x, timestep=t, return_dict=False)[0])
    return outs


def _broadcast(model, x) -> None:
    import torch.distributed as dist

    for t in [*model.parameters(), *model.buffers(), *(v for v in x.values() if isinstance(v, torch.Tensor))]:
        dist.broadcast(t.data, src=0)


def _compare(outs, refs, what: str, errors: dict) -> None:
    errs = [_rel(a, b) for a, b in zip(outs, refs)]
    errors[what] = errs
    assert max(errs) <= TOL, f"{what}: relative errors per step {errs}"


def _same_stats(stats, ref, what: str) -> None:
    assert [(r["step"], r["layer"], r["kind"]) for r in stats.records] == [
        (r["step"], r["layer"], r["kind"]) for r in ref.records
    ], what
    for a, b in zip(stats.records, ref.records):
        assert math.isclose(a["density"], b["density"], rel_tol=1e-6, abs_tol=1e-6), (what, a, b)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig, FluxTransformer2DModel, WanTransformer3DModel

    import dit_accel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    errors: dict = {}
    try:
        assert dist.get_world_size() == world
        x = _wan_inputs(device)
        ref_model = _build(WanTransformer3DModel, WAN, device)
        _broadcast(ref_model, x)
        cp_model = _build(WanTransformer3DModel, WAN, device)
        cp_model.load_state_dict(ref_model.state_dict())
        cp_model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        _compare(_run(cp_model, x, 1), _run(ref_model, x, 1), "wan stock", errors)
        for name, knobs in METHODS:
            handle = dit_accel.apply(ref_model, method=name, **COMMON, **knobs)
            ref, ref_stats = _run(ref_model, x), handle.stats()
            dit_accel.remove(ref_model)
            handle = dit_accel.apply(cp_model, method=name, **COMMON, **knobs)
            out, stats = _run(cp_model, x), handle.stats(all_ranks=True)
            dit_accel.remove(cp_model)
            _compare(out, ref, f"wan {name}", errors)
            _same_stats(stats, ref_stats, f"wan {name}")
            if name != "dense":
                assert min(r["density"] for r in stats.records) < 1, name

        fx = _flux_inputs(device)
        ref_model = _build(FluxTransformer2DModel, FLUX, device)
        _broadcast(ref_model, fx)
        cp_model = _build(FluxTransformer2DModel, FLUX, device)
        cp_model.load_state_dict(ref_model.state_dict())
        cp_model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        for name, knobs in METHODS[:2]:
            handle = dit_accel.apply(ref_model, method=name, **COMMON, **knobs)
            ref, ref_stats = _run(ref_model, fx, 3), handle.stats()
            dit_accel.remove(ref_model)
            handle = dit_accel.apply(cp_model, method=name, **COMMON, **knobs)
            out, stats = _run(cp_model, fx, 3), handle.stats(all_ranks=True)
            dit_accel.remove(cp_model)
            _compare(out, ref, f"flux {name}", errors)
            _same_stats(stats, ref_stats, f"flux {name}")

        if world == 2:  # ring attention: diffusers' own (cuDNN returns the LSE its merge needs)
            dense_ref = _build(WanTransformer3DModel, WAN, device)
            _broadcast(dense_ref, x)
            ring = _build(WanTransformer3DModel, WAN, device)
            ring.load_state_dict(dense_ref.state_dict())
            for model in (ring, dense_ref):
                model.set_attention_backend("_native_cudnn")
            ring.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
            handle = dit_accel.apply(ring, method="window", **COMMON, **METHODS[1][1])
            _compare(_run(ring, x, 2), _run(dense_ref, x, 2), "wan ring (diffusers' ring attention)", errors)
            assert handle.stats(all_ranks=True).records == [], "ring calls run diffusers' op, unrecorded"
        if rank == 0:
            with open(os.path.join(out_dir, "errors.json"), "w") as f:
                json.dump({"world": world, "errors": errors}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ulysses_equals_single_gpu(world, tmp_path):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices, found {torch.cuda.device_count()}")
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    report = json.loads((tmp_path / "errors.json").read_text())
    assert report["world"] == world
    assert {f"wan {n}" for n, _ in METHODS} <= set(report["errors"])
    print(json.dumps(report, indent=1))
