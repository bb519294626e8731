"""End to end: transformer time over a real denoising schedule, stock against every dit_accel method and
preset, compiled and not, with and without one of diffusers' step caches.

This is the number a user feels: how much sooner the video is done. Per geometry (``wan1.3b_480p_81f``,
``wan14b_720p_81f``, ``hunyuan_720p_129f``: random weights from the real configs, bf16, built on the GPU):

1. **Schedule.** Every row's per-step schedule is read from the method itself: a probe drives a tiny model of
   the same family (CPU, 2 layers, a 21-frame grid) through all ``--steps`` steps and every CFG context, with
   the row's exact dit_accel configuration and step cache, and classifies each (context, step) from
   ``handle.stats()``: ``dense``, ``sparse``, ``fused_search``, ``cached_search``, a method's own label
   (e.g. rettention's refresh), or ``skipped`` when the step cache served the step and no attention ran.
   A step cache whose decisions depend on the content (FirstBlockCache, MagCache) cannot be probed this way;
   the benchmark uses TaylorSeer (``TaylorSeerCacheConfig(use_lite_mode=True)``), whose computed steps
   follow from its config alone.
2. **Steady-state step times.** On the real model the schedule is split into runs of equal kind; the first
   ``--segments-per-kind`` runs of each kind are visited in step order, driving the tracker as the pipeline
   does (``transformer.cache_context("cond", step_index=i, num_inference_steps=n)``; repeating a step index
   repeats that step's phase). Per visited step: ``--warmup`` untimed calls (the first one's time is kept as
   ``first_call_ms``: Triton autotuning, torch.compile), then ``--repeats`` timed calls (median). One call
   is one CFG branch; each step costs one call per context, as the pipeline makes them (Wan: cond and
   uncond, separately; HunyuanVideo: one call with embedded guidance). Dense steps of a method run the stock
   op through dit_accel's processors: they take the ``dense`` row's time (``dense_fused``'s for rows that
   fuse the blocks) when that row ran in the same compile mode (``--no-share-dense`` times them per row).
   Before a row's times are used, the kind each visited step actually ran (from the stats) must equal the
   probed kind, and the output must be finite.
3. **Composition.** total = sum over contexts and steps of the time of the step's kind (its own run's time
   when visited, else the median of that kind's visited runs). ``per_step_ms`` holds the summands. The step
   cache rows are composed from a base row's kind times plus the cache's own measured costs (a step it
   serves, and its bookkeeping on a computed step, both timed on the stock model), over the probed
   schedule of base method + cache.
4. **Attention share.** Eager dit_accel rows run with ``SparseAttentionConfig(timing=True)``: the attention
   ms per call of each kind come from the stats (CUDA events around each attention call); stock rows take
   the ``dense`` row's, compiled rows their eager row's. The ``no_attention`` row replaces attention by a
   no-op: the forward's floor.
5. **Check** (Wan geometries, ``--check-rows``): a real WanPipeline run (``output_type="latent"``, no VAE,
   random prompt embeddings, UniPC flow scheduler) of the same rows, timed whole, against the composed total.

Compiled rows use ``dit_accel.pipelines.wrapped.compile_blocks(transformer, fullgraph=False)`` (diffusers'
``compile_repeated_blocks``, also where a transformer declares no repeated blocks); they run after all eager
rows (``torch._dynamo.reset()`` before each, so each row's first call carries its own compilation). A row
whose compile or run fails is recorded with its error and the run goes on; graph breaks are counted and their
first reasons kept. Results are written after every row (``benchmarks/results/e2e_<geometry>_<gpu>.json``),
so a run that is killed keeps what finished. ``--report`` turns result files into docs/e2e.md's tables.

GPU commands (after ``source benchmarks/gpu_env.sh``; the plan with its time estimate is printed first,
``--plan-only`` prints it and exits, on any machine):

    python benchmarks/bench_e2e.py --geometry wan1.3b_480p_81f                       # about 7 min
    python benchmarks/bench_e2e.py --geometry wan14b_720p_81f                        # about 8 min
    python benchmarks/bench_e2e.py --geometry hunyuan_720p_129f --rows stock,dense_auto,quality,balanced
    python benchmarks/bench_e2e.py --report benchmarks/results/e2e_*.json --report-out docs/e2e.md

CPU smoke run of the same code on tiny models and 3 steps (fp32, torch kernels, ``eager`` compile backend):

    python benchmarks/bench_e2e.py --smoke --out-dir /tmp/e2e_smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import gc
import glob
import importlib
import json
import logging
import math
import platform
import statistics
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    FLUX_DEV,
    FLUX_TINY,
    HUNYUAN_TINY,
    HUNYUAN_VIDEO,
    PIXART_SIGMA_2K,
    PIXART_TINY,
    QWEN_IMAGE,
    QWEN_IMAGE_TINY,
    SD3_TINY,
    SD35_LARGE,
    WAN_1_3B,
    WAN_14B,
    WAN_TINY,
    gpu_tag,
    sync,
    timed_ms,
    versions,
    write_json,
)

import dit_accel  # noqa: E402
from dit_accel.methods import SparseMethod, method_names  # noqa: E402
from dit_accel.pipelines.quality import STEP_CACHES, step_cache_config  # noqa: E402
from dit_accel.pipelines.wrapped import compile_blocks  # noqa: E402

logger = logging.getLogger("dit_accel.bench_e2e")

# --------------------------------------------------------------------------------------------------
# What is measured: geometries, rows, step caches (data)
# --------------------------------------------------------------------------------------------------
_SMOKE_EST = {"dense": 10, "sparse": 15, "fused_search": 25, "cached_search": 20, "custom": 5}


def _est(dense: float, sparse: float, fused_search: float, cached_search: float) -> dict:
    """Per-call ms for the printed plan (custom kinds: a sparse call's)."""
    return {
        "dense": dense,
        "sparse": sparse,
        "fused_search": fused_search,
        "cached_search": cached_search,
        "custom": sparse,
    }


def _image(
    family, config, latent, grid, text, steps, estimate_ms, smoke=False, contexts=("cond",), **extra
) -> dict:
    """An image geometry: one call per step and context (CFG batched where ``cfg_batched``), the packed token
    ``grid``, eager rows by default, no step cache or whole-pipeline check; ``smoke``: a tiny CPU one."""
    return {
        "family": family,
        "config": config,
        "latent": latent,
        "grid": grid,
        "text": text,
        **extra,
        "contexts": contexts,
        "steps": steps,
        "block": 16 if smoke else 128,
        "estimate_ms": estimate_ms,
        "compile_estimate_s": 20 if smoke else 90,
        "default_rows": ("stock", "dense", "balanced")
        if smoke
        else ("stock", "no_attention", "dense", "quality", "balanced", "fast"),
        "default_compiled": (),
        "step_cache": False,
        "check_rows": (),
        "smoke": smoke,
    }


GEOMETRIES: dict[str, dict] = {
    "wan1.3b_480p_81f": {
        "family": "wan",
        "config": WAN_1_3B,
        "latent": (1, 16, 21, 60, 104),
        "text": (1, 512, 4096),
        "contexts": ("cond", "uncond"),
        "pipeline_size": {"height": 480, "width": 832, "num_frames": 81},
        "block": 128,
        # Per-call ms used only by the printed plan (H200, eager; docs/adaspa.md, docs/radial.md).
        "estimate_ms": {
            "dense": 605,
            "sparse": 340,
            "fused_search": 900,
            "cached_search": 650,
            "custom": 257,
        },
        "compile_estimate_s": 45,
        "default_rows": None,
        "default_compiled": ("stock", "dense", "radial", "adaspa_0.8", "balanced"),
        "step_cache": True,
        "check_rows": ("stock", "adaspa_0.8", "adaspa_0.8+taylorseer"),
    },
    "wan14b_720p_81f": {
        "family": "wan",
        "config": WAN_14B,
        "latent": (1, 16, 21, 90, 160),
        "text": (1, 512, 4096),
        "contexts": ("cond", "uncond"),
        "pipeline_size": {"height": 720, "width": 1280, "num_frames": 81},
        "block": 128,
        "estimate_ms": {
            "dense": 12060,
            "sparse": 6000,
            "fused_search": 18500,
            "cached_search": 12200,
            "custom": 3800,
        },
        "compile_estimate_s": 90,
        "default_rows": ("stock", "dense", "radial", "adaspa_0.8", "rettention_window_0.05", "balanced"),
        "default_compiled": (),
        "step_cache": True,
        "check_rows": (),
    },
    "hunyuan_720p_129f": {
        "family": "hunyuan_video",
        "config": HUNYUAN_VIDEO,
        "latent": (1, 16, 33, 90, 160),
        "text": (1, 256, 4096),
        "text_valid": 64,
        "pooled": (1, 768),
        "guidance": 6.0,
        "contexts": ("cond",),  # embedded guidance: one call per step (no true CFG)
        "block": 128,
        "estimate_ms": {
            "dense": 24000,
            "sparse": 10000,
            "fused_search": 38000,
            "cached_search": 22000,
            "custom": 5500,
        },
        "compile_estimate_s": 120,
        "default_rows": ("stock", "dense", "dense_auto", "radial", "quality", "balanced", "fast"),
        "default_compiled": (),
        "step_cache": False,  # the step-cache target is Wan-14B's; --step-cache on adds it
        "check_rows": (),
    },
    # Images: FLUX.1-dev at 1024^2 and 2048^2 (packed 2x2 latents: 4,096 / 16,384 image tokens after 512 text
    # tokens), 28 steps (FluxPipeline's default), one call per step (guidance-distilled, no true CFG).
    **{
        f"flux_{px}": _image(
            "flux",
            FLUX_DEV,
            (1, (px // 16) ** 2, 64),
            (1, px // 16, px // 16),
            (1, 512, 4096),
            28,
            _est(*est),
            pooled=(1, 768),
            guidance=3.5,
        )
        for px, est in ((1024, (300, 270, 380, 320)), (2048, (1500, 900, 1900, 1400)))
    },
    # Qwen-Image at its 1:1 size, 1328^2 (83 x 83 packed tokens after 64 text tokens), 50 steps, true CFG
    # (a cond and an uncond call per step, as with a negative prompt); built in bf16 (20B: fp32 does not fit
    # 80 GB).
    "qwenimage_1328": _image(
        "qwenimage",
        QWEN_IMAGE,
        (1, 83 * 83, 64),
        (1, 83, 83),
        (1, 64, 3584),
        50,
        _est(700, 550, 900, 800),
        contexts=("cond", "uncond"),
        init_in_dtype=True,
    ),
    # SD3.5 Large at 1024^2 (64 x 64 patches before 333 text tokens, joint attention, head_dim 64) and
    # PixArt-Sigma at 2048^2 (128 x 128 patches, head_dim 72, text by cross-attention): their pipelines batch
    # CFG (one call per step of batch 2, the latents duplicated); 28 and 20 steps, the pipelines' defaults.
    "sd35_large_1024": _image(
        "sd3",
        SD35_LARGE,
        (2, 16, 128, 128),
        (1, 64, 64),
        (2, 333, 4096),
        28,
        _est(400, 350, 500, 450),
        pooled=(2, 2048),
        cfg_batched=True,
    ),
    "pixart_sigma_2048": _image(
        "pixart",
        PIXART_SIGMA_2K,
        (2, 4, 256, 256),
        (1, 128, 128),
        (2, 300, 4096),
        20,
        _est(400, 250, 500, 400),
        cfg_batched=True,
    ),
    "smoke": {
        "family": "wan",
        "config": WAN_TINY,
        "latent": (1, 16, 9, 8, 12),
        "text": (1, 8, 32),
        "contexts": ("cond", "uncond"),
        "pipeline_size": {"height": 64, "width": 96, "num_frames": 33},
        "block": 16,
        "estimate_ms": {"dense": 10, "sparse": 15, "fused_search": 25, "cached_search": 20, "custom": 5},
        "compile_estimate_s": 20,
        "default_rows": None,
        "default_compiled": ("stock", "radial"),
        "step_cache": True,
        "check_rows": ("stock", "adaspa_0.8", "adaspa_0.8+taylorseer"),
        "smoke": True,
    },
    "smoke_hunyuan": {
        "family": "hunyuan_video",
        "config": HUNYUAN_TINY,
        "latent": (1, 4, 9, 6, 8),
        "text": (1, 7, 16),
        "text_valid": 4,
        "pooled": (1, 8),
        "guidance": 6.0,
        "contexts": ("cond",),
        "block": 16,
        "estimate_ms": {"dense": 10, "sparse": 15, "fused_search": 25, "cached_search": 20, "custom": 5},
        "compile_estimate_s": 20,
        "default_rows": ("stock", "dense", "radial", "adaspa_0.8"),
        "default_compiled": (),
        "step_cache": True,
        "check_rows": (),
        "smoke": True,
    },
    "smoke_qwenimage": _image(
        "qwenimage",
        QWEN_IMAGE_TINY,
        (1, 12 * 16, 16),
        (1, 12, 16),
        (1, 8, 16),
        3,
        _SMOKE_EST,
        contexts=("cond", "uncond"),
        smoke=True,
    ),
    "smoke_sd3": _image(
        "sd3",
        SD3_TINY,
        (2, 4, 24, 32),
        (1, 12, 16),
        (2, 8, 32),
        3,
        _SMOKE_EST,
        pooled=(2, 8),
        cfg_batched=True,
        smoke=True,
    ),
    "smoke_pixart": _image(
        "pixart",
        PIXART_TINY,
        (2, 4, 24, 32),
        (1, 12, 16),
        (2, 8, 32),
        3,
        _SMOKE_EST,
        cfg_batched=True,
        smoke=True,
    ),
    "smoke_flux": _image(
        "flux",
        FLUX_TINY,
        (1, 12 * 16, 4),
        (1, 12, 16),
        (1, 8, 32),
        3,
        _SMOKE_EST,
        pooled=(1, 8),
        guidance=3.5,
        smoke=True,
    ),
}

# One row per configuration. Keys besides name / preset / note are dit_accel.apply knobs; a method name not
# in dit_accel.methods.method_names() is skipped with a note, and a preset is looked up in
# dit_accel.pipelines.presets (skipped with a note when that does not exist yet).
ROWS: list[dict] = [
    {"name": "stock", "note": "diffusers' default attention (no dit_accel)"},
    {"name": "no_attention", "method": "no_attention", "note": "attention replaced by a no-op: the floor"},
    {"name": "dense", "method": "dense", "note": "dit_accel processors, every call dense: our overhead"},
    # fuse_blocks: the blocks' elementwise work in one pass per step (Wan; eager only: compile fuses it too).
    # Wan's sparse presets set it; the _unfused rows are those presets without it.
    {"name": "dense_fused", "method": "dense", "fuse_blocks": True},
    {
        "name": "dense_xformers",
        "method": "dense",
        "dense_backend": "xformers",
        "note": "every call dense on xformers' fmha: a dense baseline of its own (fails where it cannot run)",
    },
    {
        "name": "dense_auto",
        "method": "dense",
        "dense_backend": "auto",
        "note": "every call dense on dense_attention(backend='auto'): the measured fastest dense kernel",
    },
    {"name": "window_0.1", "method": "window", "density": 0.1, "dense_steps": 0.2},
    {"name": "radial", "method": "radial", "note": "family defaults"},
    {"name": "adaspa_0.8", "method": "adaspa", "sparsity": 0.8},
    {"name": "adaspa_0.9", "method": "adaspa", "sparsity": 0.9},
    {"name": "rettention_window_0.05", "method": "rettention", "base": "window", "density": 0.05},
    {
        "name": "rettention_window_0.05_auto",
        "method": "rettention",
        "base": "window",
        "density": 0.05,
        "dense_backend": "auto",
        "note": "dense steps on dense_attention(backend='auto'), as HunyuanVideo's presets run theirs",
    },
    {
        "name": "rettention_window_0.05_lean",
        "method": "rettention",
        "base": "window",
        "density": 0.05,
        "dense_steps": 0.1,
        "refresh_every": 10,
        "note": "5 dense warm-up steps, a refresh every 10: balanced until 2026-12-05 (docs/rettention.md)",
    },
    {
        "name": "rettention_window_0.05_lean_auto",
        "method": "rettention",
        "base": "window",
        "density": 0.05,
        "dense_steps": 0.1,
        "refresh_every": 10,
        "dense_backend": "auto",
        "note": "the lean schedule with its dense steps on dense_attention(backend='auto') (HunyuanVideo)",
    },
    *(
        {
            "name": f"rettention_window_0.05_{name}{suffix}",
            "method": "rettention",
            "base": "window",
            "density": 0.05,
            "dense_steps": 0.1,
            **schedule,
            **knobs,
            "note": f"{what}: a candidate preset (docs/rettention.md)" + note,
        }
        for name, schedule, what in (
            ("lean_r15", {"refresh_every": 15}, "the lean schedule with a refresh every 15 steps"),
            ("lean_r25", {"refresh_every": 25}, "the lean schedule with a refresh every 25 steps"),
            ("front3", {"refresh_at": (0.2, 0.4)}, "10% warm-up, refreshes at 10%, 20% and 40% of the run"),
            ("front2", {"refresh_at": (0.3,)}, "10% warm-up, refreshes at 10% and 30% of the run"),
            (
                "lean6",
                {"refresh_at": (0.2, 0.3, 0.5, 0.7, 0.9)},
                "10% warm-up, refreshes at 10, 20, 30, 50, 70 and 90% of the run",
            ),
            ("lean5a", {"refresh_at": (0.2, 0.3, 0.5, 0.7)}, "10% warm-up; refresh at 10-20-30-50-70%"),
            ("lean5b", {"refresh_at": (0.2, 0.4, 0.6, 0.8)}, "balanced: refreshes at 10-20-40-60-80%"),
        )
        for suffix, knobs, note in (
            ("", {}, ""),
            ("_auto", {"dense_backend": "auto"}, ", dense steps on dense_attention(backend='auto')"),
        )
    ),
    {"name": "rettention_window_0.1", "method": "rettention", "base": "window", "density": 0.1},
    {"name": "rettention_radial", "method": "rettention", "base": "radial"},
    {"name": "rettention_adaspa_0.95", "method": "rettention", "base": "adaspa", "sparsity": 0.95},
    {"name": "rettention_adaspa_0.9", "method": "rettention", "base": "adaspa", "sparsity": 0.9},
    {"name": "quality", "preset": "quality"},
    {"name": "balanced", "preset": "balanced"},
    {"name": "fast", "preset": "fast"},
    {"name": "quality_unfused", "preset": "quality", "fuse_blocks": False},
    {"name": "balanced_unfused", "preset": "balanced", "fuse_blocks": False},
    {"name": "fast_unfused", "preset": "fast", "fuse_blocks": False},
]
# Rows that are never compiled (they measure something compile does not change).
EAGER_ONLY = ("no_attention", "dense_fused", "quality_unfused", "balanced_unfused", "fast_unfused")

# The step cache composed with rows: the quality harness's settings, so its quality rows are of this cache.
# TaylorSeer's computed steps depend only on its config, so the probe reads the exact schedule; lite mode
# predicts the output projection and skips every block on the other steps.
CACHES: dict[str, dict] = STEP_CACHES
SMOKE_CACHE_KNOBS = {"cache_interval": 2, "disable_cache_before_step": 1}
CACHE_BASES = (
    "stock",
    "balanced",
    "adaspa_0.8",
    "adaspa_0.9",
    "radial",
    "rettention_window_0.05",
    "rettention_window_0.05_lean5b",
    "rettention_window_0.05_lean5b_auto",
)

# The probe: a tiny model per family on the CPU, at a 21 x 8 x 8 token grid (4 blocks of 16 per frame) where
# every method's pattern is sparse, the per-frame window of rettention's base included.
PROBES = {
    "wan": {"config": WAN_TINY, "latent": (1, 16, 21, 16, 16), "text": (1, 8, 32)},
    "hunyuan_video": {
        "config": HUNYUAN_TINY,
        "latent": (1, 4, 21, 8, 8),
        "text": (1, 7, 16),
        "text_valid": 4,
        "pooled": (1, 8),
        "guidance": 6.0,
    },
    # 16 x 16 image tokens (with 8 text tokens in flux's and sd3's joint attention): 16 blocks of 16 tokens.
    "qwenimage": {"config": QWEN_IMAGE_TINY, "latent": (1, 256, 16), "grid": (1, 16, 16), "text": (1, 8, 16)},
    "sd3": {
        "config": SD3_TINY,
        "latent": (1, 4, 32, 32),
        "grid": (1, 16, 16),
        "text": (1, 8, 32),
        "pooled": (1, 8),
    },
    "pixart": {"config": PIXART_TINY, "latent": (1, 4, 32, 32), "grid": (1, 16, 16), "text": (1, 8, 32)},
    "flux": {
        "config": FLUX_TINY,
        "latent": (1, 256, 4),
        "grid": (1, 16, 16),
        "text": (1, 8, 32),
        "pooled": (1, 8),
        "guidance": 3.5,
    },
}
PROBE_BLOCK = 16

META_KEYS = ("name", "preset", "note")


class NoAttention(SparseMethod):
    """Attention replaced by a no-op (returns v): the forward without attention."""

    name = "no_attention"

    def attention(self, q, k, v, call):
        call.label = "no_attention"
        return v


# --------------------------------------------------------------------------------------------------
# Models and inputs
# --------------------------------------------------------------------------------------------------
def _model_class(family: str):
    import diffusers

    return getattr(
        diffusers,
        {
            "wan": "WanTransformer3DModel",
            "hunyuan_video": "HunyuanVideoTransformer3DModel",
            "flux": "FluxTransformer2DModel",
            "qwenimage": "QwenImageTransformer2DModel",
            "sd3": "SD3Transformer2DModel",
            "pixart": "PixArtTransformer2DModel",
        }[family],
    )


def build_model(family: str, config: dict, device, dtype, init_in_dtype: bool = False) -> torch.nn.Module:
    """Random weights from ``config``, initialised on ``device`` in fp32 and cast to ``dtype`` as
    ``from_pretrained(torch_dtype=dtype)`` loads them: the model's ``_keep_in_fp32_modules`` stay fp32.
    ``init_in_dtype``: initialised in ``dtype`` directly (a model whose fp32 weights do not fit the GPU)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    if init_in_dtype:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = _model_class(family)(**config)
    finally:
        torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    if dtype != torch.float32:
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if p.is_floating_point() and not any(k in name.split(".") for k in keep):
                p.data = p.data.to(dtype)
    return model


def make_inputs(family: str, spec: dict, contexts, device, dtype) -> dict[str, dict]:
    """Forward kwargs (all but ``timestep``) per CFG context, as the family's pipeline passes them."""
    g = torch.Generator(device="cpu").manual_seed(1)

    def randn(shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    if spec.get("cfg_batched"):  # the pipeline's torch.cat([latents] * 2)
        latent = randn((1, *spec["latent"][1:])).expand(spec["latent"]).contiguous()
    else:
        latent = randn(spec["latent"])
    out = {}
    for ctx in contexts:
        kw = {"hidden_states": latent, "encoder_hidden_states": randn(spec["text"])}
        if family == "flux":
            # FluxPipeline: image ids (0, row, col) of the packed latent grid, zero text ids, the pooled
            # CLIP embedding and the distilled guidance scale.
            _, h, w = spec["grid"]
            ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
            ids[..., 1] = torch.arange(h, device=device)[:, None]
            ids[..., 2] = torch.arange(w, device=device)[None, :]
            kw["img_ids"] = ids.reshape(h * w, 3)
            kw["txt_ids"] = torch.zeros(spec["text"][1], 3, device=device, dtype=dtype)
            kw["pooled_projections"] = randn(spec["pooled"])
            kw["guidance"] = torch.full((spec["latent"][0],), spec["guidance"], device=device)
        elif family == "qwenimage":
            # QwenImagePipeline: the packed grid's shape; a single prompt's all-valid mask is dropped (None)
            kw["img_shapes"] = [[tuple(spec["grid"])]] * spec["latent"][0]
        elif family == "sd3":
            kw["pooled_projections"] = randn(spec["pooled"])
        elif family == "pixart":
            # PixArtSigmaPipeline: the T5 mask (every token valid here) and no size conditioning
            kw["encoder_attention_mask"] = torch.ones(spec["text"][:2], device=device, dtype=dtype)
            kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        elif family == "hunyuan_video":
            mask = torch.zeros(spec["text"][:2], dtype=dtype, device=device)
            mask[:, : spec["text_valid"]] = 1
            kw["encoder_attention_mask"] = mask
            kw["pooled_projections"] = randn(spec["pooled"])
            kw["guidance"] = torch.full(
                (spec["latent"][0],), spec["guidance"] * 1000.0, device=device, dtype=dtype
            )
        out[ctx] = kw
    return out


def _timestep(step: int, steps: int, device, scale: float = 1000.0, batch: int = 1) -> torch.Tensor:
    return torch.full((batch,), scale * (1.0 - step / steps), device=device)


@torch.inference_mode()
def forward_call(model, inputs, context: str, step: int, steps: int, device) -> torch.Tensor:
    """One transformer call as the pipeline makes it: inside ``cache_context`` with the step index
    (FluxPipeline passes its timestep divided by 1000)."""
    # FluxPipeline and QwenImagePipeline pass their timestep divided by 1000
    scale = (
        1.0 if type(model).__name__ in ("FluxTransformer2DModel", "QwenImageTransformer2DModel") else 1000.0
    )
    kwargs = inputs[context]
    t = _timestep(step, steps, device, scale, kwargs["hidden_states"].shape[0])
    with _cache_context(model, context, step_index=step, num_inference_steps=steps):
        return model(**kwargs, timestep=t, return_dict=False)[0]


@contextlib.contextmanager
def _cache_context(model, name: str, **kwargs):
    """``model.cache_context``; for models without it (SD3, PixArt: their pipelines pass none, and the step
    tracker counts their timesteps instead) the same context set on the model's hooks, as it does."""
    if hasattr(model, "cache_context"):
        with model.cache_context(name, **kwargs):
            yield
        return
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(model, CacheContext(name, **kwargs))
    try:
        yield
    finally:
        _set_cache_context(model, None)


# --------------------------------------------------------------------------------------------------
# Installing a row: step cache and dit_accel
# --------------------------------------------------------------------------------------------------
class Skip(Exception):
    """A row that cannot run in this checkout (unknown method, no presets yet): recorded with its reason."""


def _preset_knobs(name: str, family: str) -> dict:
    """Method and knobs of the family's preset ``name`` (``dit_accel.pipelines.presets``)."""
    from dit_accel.pipelines.presets import get_preset

    try:
        preset = get_preset(family, name)
    except ValueError as e:
        raise Skip(str(e)) from None
    return {"method": preset.method, **dict(preset.knobs)}


def row_knobs(row: dict, family: str) -> dict | None:
    """dit_accel.apply knobs of a row (None: stock). Raises Skip for what this checkout lacks."""
    knobs = {k: v for k, v in row.items() if k not in META_KEYS}
    if "fuse_blocks" in knobs:  # with or without: a comparison only where the family has a fused forward
        fam = importlib.import_module(f"dit_accel.processors.{family}").FAMILY
        if fam.fused_blocks is None:
            raise Skip(f"fuse_blocks: the {family} family has no fused block forward")
    if row.get("preset"):  # the preset's knobs, then the row's own (fuse_blocks)
        return {**_preset_knobs(row["preset"], family), **knobs}
    if not knobs:
        return None
    method = knobs.get("method")
    if method == "no_attention":
        knobs["method"] = NoAttention()
    elif isinstance(method, str) and method not in method_names():
        raise Skip(f"method {method!r} is not available (dit_accel.methods.method_names(): {method_names()})")
    return knobs


def cache_config(name: str, smoke: bool, **overrides):
    knobs = {**CACHES[name], **(SMOKE_CACHE_KNOBS if smoke else {}), **overrides}
    return step_cache_config(name, **knobs), knobs


def install(
    model, knobs: dict | None, *, block: int, backend: str, timing: bool, cache=None, force_block=False
):
    """Enable ``cache`` (a diffusers cache config), then dit_accel with ``knobs`` on ``model``; the handle
    (None for stock). ``block`` fills unset block sizes (``force_block``: replaces them; the probe's)."""
    if cache is not None:
        model.enable_cache(cache)
    if knobs is None:
        return None
    knobs = dict(knobs)
    if "config" in knobs:
        if force_block:
            knobs["config"] = dataclasses.replace(knobs["config"], block_q=block, block_k=block)
    elif force_block:
        knobs.update(block_q=block, block_k=block)
    else:
        knobs.setdefault("block_q", block)
        knobs.setdefault("block_k", block)
    return dit_accel.apply(model, backend=backend, timing=timing, **knobs)


def uninstall(model) -> None:
    dit_accel.remove(model)
    if getattr(model, "_cache_config", None) is not None:
        model.disable_cache()


# --------------------------------------------------------------------------------------------------
# Step kinds
# --------------------------------------------------------------------------------------------------
def classify(records: list[dict], num_layers: int) -> str:
    """The kind of one call from its attention records: "skipped" when the step cache ran no attention layer,
    "partial" when it ran some, else the non-dense labels (joined by "+") or "dense"."""
    if not records:
        return "skipped"
    if len(records) < num_layers:
        return "partial"
    labels = sorted({r["kind"] for r in records} - {"dense"})
    return "+".join(labels) if labels else "dense"


def segments(kinds: list[str]) -> list[tuple[str, int, int]]:
    """Maximal runs of equal kind: (kind, first step, stop step)."""
    out, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            out.append((kinds[start], start, i))
            start = i
    return out


def probe_schedule(family: str, knobs: dict | None, steps: int, contexts, cache=None) -> dict:
    """Run the row's configuration on a tiny model of ``family`` (CPU) for ``steps`` steps; the kind of
    every (context, step)."""
    spec = PROBES[family]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads cost more than they give
    try:
        return _probe(family, spec, knobs, steps, contexts, cache)
    finally:
        torch.set_num_threads(threads)


def _probe(family, spec, knobs, steps, contexts, cache) -> dict:
    model = build_model(family, spec["config"], "cpu", torch.float32)
    inputs = make_inputs(family, spec, contexts, "cpu", torch.float32)
    handle = install(
        model,
        knobs if knobs is not None else {"method": "dense"},
        block=PROBE_BLOCK,
        backend="torch",
        timing=False,
        cache=cache,
        force_block=True,
    )
    for step in range(steps):
        for ctx in contexts:
            forward_call(model, inputs, ctx, step, steps, "cpu")
    num_layers = len(handle.layers)
    by_call = defaultdict(list)
    for r in handle.stats().records:
        by_call[(r["context"], r["step"])].append(r)
    schedule = {ctx: [classify(by_call[(ctx, s)], num_layers) for s in range(steps)] for ctx in contexts}
    uninstall(model)
    return schedule


# --------------------------------------------------------------------------------------------------
# The benchmark of one geometry
# --------------------------------------------------------------------------------------------------
def _estimate_key(kind: str) -> str:
    if kind in ("dense", "fused_search", "cached_search"):
        return kind
    if "refresh" in kind:
        return "fused_search"  # a full pass and a little more
    if kind == "no_attention":
        return "custom"
    if kind == "skipped":
        return "skipped"
    return "sparse" if "sparse" in kind else "dense"


class Runner:
    def __init__(self, name: str, args, log):
        self.name, self.args, self.log = name, args, log
        self.geom = GEOMETRIES[name]
        self.smoke = bool(self.geom.get("smoke"))
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.backend = "torch" if self.smoke else args.backend
        self.compile_backend = "eager" if self.smoke else args.compile_backend
        self.steps = args.steps or (3 if self.smoke else self.geom.get("steps", 50))
        self.contexts = tuple(self.geom["contexts"])
        self.repeats = args.repeats or (2 if self.smoke else (3 if name.startswith("wan1.3b") else 1))
        self.warmup = args.warmup if args.warmup is not None else 1
        self.segments_per_kind = args.segments_per_kind or (
            2 if name.startswith("wan1.3b") or self.smoke else 1
        )
        self.out_path = Path(args.out_dir) / f"e2e_{name}_{'cpu' if self.smoke else gpu_tag()}.json"
        self.results: dict[tuple[str, bool], dict] = {}
        self._probes: dict[tuple, dict] = {}
        self.use_cache = {"on": True, "off": False}.get(args.step_cache, self.geom["step_cache"])
        self.cache_costs: dict[bool, dict] = {}
        self._tunings_seen = 0  # autotuner picks already reported by earlier rows
        self.stock_out = None
        self.model = None
        self.started = time.perf_counter()
        self.result = self._header()

    # -- selection ------------------------------------------------------------------------------
    def selected(self) -> list[tuple[dict, bool]]:
        """(row, compiled) pairs to time, eager first."""
        names = [r["name"] for r in ROWS]
        wanted = _match(self.args.rows, names) if self.args.rows else list(self.geom["default_rows"] or names)
        if self.args.compile == "off":
            compiled = []
        elif self.args.compile_rows:
            compiled = _match(self.args.compile_rows, names)
        elif self.args.compile == "on" or self.geom["default_compiled"] is None:
            compiled = wanted
        else:
            compiled = list(self.geom["default_compiled"])
        compiled = [n for n in compiled if n in wanted and n not in EAGER_ONLY]
        rows = {r["name"]: r for r in ROWS}
        # "only": the compiled rows, plus eager stock when selected (every speedup's denominator).
        eager = ["stock"] if self.args.compile == "only" else names
        pairs = [(rows[n], False) for n in eager if n in wanted]
        pairs += [(rows[n], True) for n in names if n in compiled]
        return pairs

    def _step_cache_rows(self, compiled: bool) -> None:
        """Measure the step cache's costs in this compile mode; compose it with every base row that ran."""
        if not self.use_cache or ("stock", compiled) not in self.results:
            return
        self._measure_cache(compiled)
        for cache in CACHES:
            for base in CACHE_BASES:
                if (base, compiled) in self.results:
                    self._compose_cache_row(cache, base, compiled)

    # -- header, flush --------------------------------------------------------------------------
    def _header(self) -> dict:
        g = self.geom
        if "grid" in g:  # images: the packed latent's token grid
            grid = tuple(g["grid"])
        else:
            _, _, frames, h, w = g["latent"]
            p = g["config"].get("patch_size", 2)
            ph, pw = (p[1], p[2]) if isinstance(p, tuple) else (p, p)
            pt = g["config"].get("patch_size_t", 1) if not isinstance(p, tuple) else p[0]
            grid = (frames // pt, h // ph, w // pw)
        # families whose self-attention also runs over the text tokens
        text_tokens = g["text"][1] if g["family"] in ("hunyuan_video", "flux", "sd3", "qwenimage") else 0
        return {
            "benchmark": "bench_e2e",
            "geometry": {
                "name": self.name,
                "family": g["family"],
                "config": {k: v for k, v in g["config"].items()},
                "latent": list(g["latent"]),
                "text": list(g["text"]),
                "grid": list(grid),
                "tokens": math.prod(grid) + text_tokens,
                "contexts": list(self.contexts),
                "calls_per_step": len(self.contexts),
            },
            "steps": self.steps,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else platform.processor() or "cpu",
            "versions": versions(),
            "stock_attention": "diffusers default dispatch (native SDPA)",
            "timer": f"perf_counter, device synced per call; {self.warmup} warm-up, median of {self.repeats}",
            "knobs": {
                "repeats": self.repeats,
                "warmup": self.warmup,
                "segments_per_kind": self.segments_per_kind,
                "share_dense": not self.args.no_share_dense,
                "backend": self.backend,
                "compile": f"compile_blocks(fullgraph=False, backend={self.compile_backend!r})",
                "block": self.geom["block"],
            },
            "rows": [],
            "checks": [],
            "notes": [],
        }

    def flush(self) -> None:
        self.result["elapsed_s"] = time.perf_counter() - self.started
        write_json(self.out_path, self.result)

    def add_row(self, row: dict) -> None:
        self.result["rows"].append(row)
        self.flush()
        status = row["status"]
        msg = f"{row['row']}{' (compiled)' if row['compiled'] else ''}: {status}"
        if status == "ok":
            msg += f", {row['total_s']:.2f} s over {self.steps} steps"
            if row.get("speedup"):
                msg += f", {row['speedup']:.2f}x"
        else:
            msg += f" ({row.get('error') or row.get('reason')})"
        self.log(f"[{self.name}] {msg}")

    # -- plan -----------------------------------------------------------------------------------
    def plan(self) -> tuple[list, float]:
        """The probed schedules of every selected row and the estimated seconds of the whole run."""
        est = self.geom["estimate_ms"]
        total_ms = 0.0
        planned = []
        selected = {(r["name"], c) for (r, c) in self.selected()}
        for row, compiled in self.selected():
            try:
                schedule = self.probe(row["name"])
            except Skip as e:
                planned.append((row, compiled, None, str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                planned.append((row, compiled, None, f"probe failed: {type(e).__name__}: {e}"))
                continue
            visits = self._visits(
                schedule["cond"], (_dense_source(row, self.geom["family"], compiled), compiled) in selected
            )
            ms = sum(
                (self.warmup + self.repeats) * est.get(_estimate_key(k), est["dense"]) for k, _, _ in visits
            )
            factor = 0.8 if compiled else 1.0
            total_ms += ms * factor + (self.geom["compile_estimate_s"] * 1e3 if compiled else 0.0)
            planned.append((row, compiled, schedule, None))
        if self.use_cache and any(r["name"] == "stock" for r, _, s, _ in planned if s):
            # computed calls: the first (untimed) and ``repeats``; served calls cost little
            total_ms += (1 + self.repeats) * est["dense"] * (1 + int(any(c for _, c, s, _ in planned if s)))
        for name in self.geom["check_rows"] if not self.args.no_check else ():
            total_ms += self.steps * len(self.contexts) * est["dense"] * (0.7 if name != "stock" else 1.0)
        return planned, total_ms / 1e3

    def probe(self, name: str, cache: str | None = None) -> dict:
        """The probed schedule of row ``name`` (with step cache ``cache``), memoised per run."""
        key = (name, cache)
        if key not in self._probes:
            cfg = cache_config(cache, self.smoke)[0] if cache else None
            family = self.geom["family"]
            knobs = row_knobs(_row(name), family)
            self._probes[key] = probe_schedule(family, knobs, self.steps, self.contexts, cfg)
        return self._probes[key]

    def _visits(self, kinds: list[str], share_dense: bool) -> list[tuple[str, int, int]]:
        seen: Counter = Counter()
        visits = []
        for kind, start, stop in segments(kinds):
            if kind == "dense" and share_dense and not self.args.no_share_dense:
                continue
            if seen[kind] < self.segments_per_kind:
                visits.append((kind, start, stop))
            seen[kind] += 1
        return visits

    # -- running --------------------------------------------------------------------------------
    def run(self) -> dict:
        planned, est_s = self.plan()
        self.result["plan"] = {
            "estimated_s": est_s,
            "rows": [
                {
                    "row": r["name"],
                    "compiled": c,
                    "schedule": _schedule_text(s["cond"]) if s else None,
                    "skip": why,
                }
                for r, c, s, why in planned
            ],
        }
        self.log(f"[{self.name}] plan: {len(planned)} rows, about {est_s / 60:.1f} min on the reference GPU")
        for r, c, s, why in planned:
            self.log(
                f"    {r['name']:<28} {'compiled' if c else 'eager':<10}{why or _schedule_text(s['cond'])}"
            )
        if self.args.plan_only:
            return self.result
        self.flush()

        g = self.geom
        t0 = time.perf_counter()
        self.model = build_model(
            g["family"], g["config"], self.device, self.dtype, init_in_dtype=g.get("init_in_dtype", False)
        )
        sync(self.device)
        self.result["model_build_s"] = time.perf_counter() - t0
        self.inputs = make_inputs(g["family"], g, self.contexts, self.device, self.dtype)

        eager = [p for p in planned if not p[1]]
        compiled = [p for p in planned if p[1]]
        for item in eager:
            self._run_row(*item)
        self._backfill_attention()
        self._step_cache_rows(False)
        if not self.args.no_check:
            for name in g["check_rows"]:
                self._check(name)
        if compiled:
            try:
                self._compile()
            except Exception as e:  # noqa: BLE001 - every compiled row records the failure
                compiled = [
                    (r, c, None, f"compile_blocks failed: {type(e).__name__}: {e}") for r, c, *_ in compiled
                ]
        for item in compiled:
            self._run_row(*item)
        if compiled:
            self._backfill_attention()
            self._step_cache_rows(True)
        self.flush()
        return self.result

    def _backfill_attention(self) -> None:
        """Attention ms of kinds a row could not time itself (stock: from the dense row, which runs later)."""
        for (name, compiled), res in self.results.items():
            for kind, k in res["step_kinds"].items():
                if k["attention_ms_per_call"] is None:
                    attn, source = self._attention(name, kind, {}, compiled)
                    if attn is not None and k["ms_per_call"]:
                        k.update(
                            attention_ms_per_call=attn,
                            attention_source=source,
                            non_attention_share=1.0 - attn / k["ms_per_call"],
                        )
        self.flush()

    def _compile(self) -> None:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 256))
        # diffusers' compile_repeated_blocks, also for transformers that declare none (SD3, PixArt)
        compile_blocks(self.model, fullgraph=False, backend=self.compile_backend)

    def _base_row(self, row: dict, compiled: bool) -> dict:
        return {
            "row": row["name"],
            "compiled": compiled,
            "knobs": {k: v for k, v in row.items() if k not in ("name", "note")},
            "note": row.get("note"),
            "cache": None,
        }

    def _run_row(self, row: dict, compiled: bool, schedule, why) -> None:
        res = self._base_row(row, compiled)
        if schedule is None:
            res.update(status="skipped", reason=why)
            self.add_row(res)
            return
        res["schedule"] = schedule
        if compiled:
            from torch._dynamo.utils import counters

            torch._dynamo.reset()
            counters.clear()
        t0 = time.perf_counter()
        try:
            self._time_row(row, compiled, schedule, res)
        except Exception as e:  # noqa: BLE001 - a failing row is recorded and the run goes on
            res.update(
                status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6)
            )
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
        finally:
            if compiled:
                from torch._dynamo.utils import counters

                breaks = counters["graph_break"]
                res["graph_breaks"] = int(sum(breaks.values()))
                res["graph_break_reasons"] = [r.split("\n")[0][:300] for r in list(breaks)[:5]]
            try:
                uninstall(self.model)
            except Exception as e:  # noqa: BLE001
                res.setdefault("notes", []).append(f"uninstall failed: {type(e).__name__}: {e}")
        res["wall_s"] = time.perf_counter() - t0
        res["tuned"] = self._new_tunings()
        if res.get("status") == "ok":
            self.results[(row["name"], compiled)] = res
            self._speedups(res)
        self.add_row(res)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _new_tunings(self) -> list[dict]:
        """The autotuner picks made since the previous row (a tuning key is tuned once per process, at
        its first launch, so later rows at other densities inherit it)."""
        try:
            from dit_accel.kernels.triton_common import tuned_configs
        except ImportError:  # no Triton: nothing was tuned
            return []
        picks = tuned_configs()
        seen, self._tunings_seen = self._tunings_seen, len(picks)
        return picks[seen:]

    def _time_row(self, row, compiled, schedule, res) -> None:
        knobs = row_knobs(row, self.geom["family"])
        timing = knobs is not None and not compiled
        handle = install(self.model, knobs, block=self.geom["block"], backend=self.backend, timing=timing)
        if handle is not None:
            res["resolved"] = {
                "method": handle.method.name,
                "dense_steps": handle.config.dense_steps,
                "dense_layers": list(handle.config.dense_layers or ()),
                "block": handle.config.block_q,
            }
            if row.get("preset"):  # what the preset was when it ran: presets change, result files stay
                plain = (str, int, float, tuple)
                res["preset_knobs"] = {k: v for k, v in knobs.items() if isinstance(v, plain)}
        dense_ref = self.results.get((_dense_source(row, self.geom["family"], compiled), compiled))
        share = dense_ref is not None and not self.args.no_share_dense
        visits = self._visits(schedule["cond"], share)
        timed = []
        verified = True
        out = None
        for kind, start, stop in visits:
            calls = []
            for _ in range(self.warmup + self.repeats):
                ms, out = timed_ms(
                    lambda: forward_call(self.model, self.inputs, "cond", start, self.steps, self.device),
                    self.device,
                )
                calls.append(ms)
            seg = {
                "kind": kind,
                "start": start,
                "stop": stop,
                "visited_step": start,
                "first_call_ms": calls[0] if self.warmup else None,
                "times_ms": calls[self.warmup :],
                "ms_per_call": statistics.median(calls[self.warmup :]),
                "source": "timed",
            }
            if handle is not None:
                seen, attn_ms, density = self._step_stats(handle, start)
                seg["seen_kind"] = seen
                seg["attention_ms_per_call"] = attn_ms
                seg["density"] = density
                if seen != kind:
                    verified = False
            timed.append(seg)
            if start == 0 and row["name"] in ("stock", "dense") and not compiled:
                self._check_dense(row["name"], out, res)
        res["output_finite"] = bool(out is None or torch.isfinite(out).all())
        res["schedule_verified"] = verified
        self._compose(res, schedule, timed, dense_ref if share else None, compiled)
        res["status"] = "ok"
        if not verified:
            res["notes"] = res.get("notes", []) + [
                "a visited step ran a different kind than the probe said; no speedup reported"
            ]

    def _step_stats(self, handle, step: int) -> tuple[str, float | None, float | None]:
        """Kind of the latest call at ``step`` (cond), its attention ms per call, its mean sparse density."""
        records = [r for r in handle.stats().records if r["context"] == "cond" and r["step"] == step]
        n = len(handle.layers)
        calls = len(records) // n if n and len(records) % n == 0 else 0
        last = records[-n:] if calls else records
        kind = classify(last, n)
        attn = None
        timed = records[(self.warmup * n) :] if calls > self.warmup else []
        if timed and all(r["time_ms"] is not None for r in timed):
            attn = sum(r["time_ms"] for r in timed) / (len(timed) / n)
        dens = [r["density"] for r in last if r["kind"] != "dense" and not math.isnan(r["density"])]
        return kind, attn, (sum(dens) / len(dens) if dens else None)

    def _check_dense(self, name: str, out: torch.Tensor, res: dict) -> None:
        if name == "stock":
            self.stock_out = out.detach().clone()
        elif self.stock_out is not None:
            res["dense_equals_stock"] = bool(torch.equal(out, self.stock_out))

    def _compose(
        self, res: dict, schedule: dict, timed: list[dict], dense_ref: dict | None, compiled
    ) -> None:
        """Per-step ms over every context from the timed segments (see the module docstring, 3)."""
        by_kind: dict[str, list[float]] = defaultdict(list)
        attn_by_kind: dict[str, list[float]] = defaultdict(list)
        for seg in timed:
            by_kind[seg["kind"]].append(seg["ms_per_call"])
            if seg.get("attention_ms_per_call") is not None:
                attn_by_kind[seg["kind"]].append(seg["attention_ms_per_call"])
        if dense_ref is not None:
            k = dense_ref["step_kinds"]["dense"]
            by_kind["dense"].append(k["ms_per_call"])
            if k.get("attention_ms_per_call") is not None:
                attn_by_kind["dense"].append(k["attention_ms_per_call"])
        timed_at = {(s["kind"], s["start"]): s for s in timed}
        timed_kinds = {s["kind"] for s in timed}
        per_step = [0.0] * self.steps
        segs = []
        for ctx in self.contexts:
            for kind, start, stop in segments(schedule[ctx]):
                seg = timed_at.get((kind, start)) if ctx == "cond" else None
                if seg is not None:
                    ms, source = seg["ms_per_call"], "timed"
                elif by_kind.get(kind):
                    ms = statistics.median(by_kind[kind])
                    source = "dense row" if kind == "dense" and kind not in timed_kinds else "kind median"
                else:
                    raise RuntimeError(f"no time for kind {kind!r} (steps {start}-{stop - 1}, context {ctx})")
                for s in range(start, stop):
                    per_step[s] += ms
                segs.append(
                    {
                        "context": ctx,
                        "kind": kind,
                        "start": start,
                        "stop": stop,
                        "ms_per_call": ms,
                        "source": source,
                    }
                )
        self._fill(res, schedule, per_step, segs, by_kind, attn_by_kind, compiled)
        res["timed_segments"] = timed
        first = [s["first_call_ms"] - s["ms_per_call"] for s in timed if s["first_call_ms"] is not None]
        res["first_call_extra_s"] = sum(first) / 1e3

    def _fill(self, res, schedule, per_step, segs, by_kind, attn_by_kind, compiled) -> None:
        counts = Counter(k for ctx in self.contexts for k in schedule[ctx])
        kinds = {}
        for kind, calls in counts.items():
            ms = statistics.median(by_kind[kind]) if by_kind.get(kind) else None
            attn, source = self._attention(res["row"], kind, attn_by_kind, compiled)
            kinds[kind] = {
                "steps": sum(1 for s in schedule[self.contexts[0]] if s == kind),
                "calls": calls,
                "ms_per_call": ms,
                "ms_per_step": ms * calls / max(1, sum(1 for s in schedule[self.contexts[0]] if s == kind))
                if ms
                else None,
                "attention_ms_per_call": attn,
                "attention_source": source,
                "non_attention_share": (1.0 - attn / ms) if (attn is not None and ms) else None,
            }
        res["step_kinds"] = kinds
        res["segments"] = segs
        res["per_step_ms"] = per_step
        res["total_s"] = sum(per_step) / 1e3

    def _attention(self, row_name, kind, attn_by_kind, compiled) -> tuple[float | None, str | None]:
        if attn_by_kind.get(kind):
            return statistics.median(attn_by_kind[kind]), "timing stats"
        if kind == "no_attention":
            return 0.0, "no attention"
        eager = self.results.get((row_name, False))
        if compiled and eager and kind in eager["step_kinds"]:
            return eager["step_kinds"][kind]["attention_ms_per_call"], "eager row"
        dense = self.results.get(("dense", False))
        if kind == "dense" and dense:
            return dense["step_kinds"]["dense"]["attention_ms_per_call"], "dense row (eager)"
        return None, None

    def _speedups(self, res: dict) -> None:
        stock = self.results.get(("stock", False))
        same = self.results.get(("stock", res["compiled"]))
        ok = res["schedule_verified"] and res["output_finite"] and res.get("dense_equals_stock", True)
        res["speedup"] = stock["total_s"] / res["total_s"] if stock and ok else None
        res["speedup_vs_same_compile_stock"] = same["total_s"] / res["total_s"] if same and ok else None

    # -- step cache -----------------------------------------------------------------------------
    def _measure_cache(self, compiled: bool) -> None:
        """On the stock model with the step cache: ms of a step it serves and of a step it computes."""
        name = next(iter(CACHES))
        stock = self.results.get(("stock", compiled))
        if stock is None:
            return
        cfg, knobs = cache_config(name, self.smoke, cache_interval=3, disable_cache_before_step=1)
        ran = []
        probe_block = next(m for n, m in self.model.named_modules() if _is_block(n))
        leaf = next(m for m in probe_block.modules() if isinstance(m, torch.nn.Linear))
        hook = leaf.register_forward_pre_hook(lambda *_: ran.append(True))
        computed, served = [], []
        try:
            install(self.model, None, block=self.geom["block"], backend=self.backend, timing=False, cache=cfg)
            # Call 0 fills the cache (computed, untimed). Then ``warmup`` untimed and ``repeats`` timed calls
            # of each kind; eager computed calls need no warm-up (the stock row ran them), compiled ones do
            # (the cache's update path compiles on its first computed call after call 0).
            skip_computed = self.warmup if compiled else 0
            step = 0
            while step < 60 and (
                len(computed) < skip_computed + self.repeats or len(served) < self.warmup + self.repeats
            ):
                ran.clear()
                ms, _ = timed_ms(
                    lambda: forward_call(self.model, self.inputs, "cond", step, self.steps, self.device),
                    self.device,
                )
                if step > 0:
                    (computed if ran else served).append(ms)
                step += 1
            computed, served = computed[skip_computed:], served[self.warmup :]
            dense_ms = stock["step_kinds"]["dense"]["ms_per_call"]
            cost = {
                "cache": name,
                "measured_with": knobs,
                "compiled": compiled,
                "served_times_ms": served,
                "computed_times_ms": computed,
                "served_ms_per_call": statistics.median(served),
                "computed_ms_per_call": statistics.median(computed),
                "stock_dense_ms_per_call": dense_ms,
            }
            # The cache's bookkeeping on a computed step; a negative difference is timing noise.
            cost["computed_overhead_ms"] = max(0.0, cost["computed_ms_per_call"] - dense_ms)
            cost["computed_minus_dense_ms"] = cost["computed_ms_per_call"] - dense_ms
            self.cache_costs[compiled] = cost
            self.result.setdefault("cache_costs", []).append(cost)
            self.log(
                f"[{self.name}] {name}{' (compiled)' if compiled else ''}: a served step "
                f"{cost['served_ms_per_call']:.1f} ms/call, computed-step overhead "
                f"{cost['computed_overhead_ms']:.1f} ms"
            )
        except Exception as e:  # noqa: BLE001
            self.result["notes"].append(f"step cache cost measurement failed: {type(e).__name__}: {e}")
        finally:
            hook.remove()
            uninstall(self.model)
        self.flush()

    def _compose_cache_row(self, cache: str, base: str, compiled: bool) -> None:
        base_res = self.results[(base, compiled)]
        knobs = cache_config(cache, self.smoke)[1]
        res = {
            "row": f"{base}+{cache}",
            "compiled": compiled,
            "knobs": base_res["knobs"],
            "cache": {"name": cache, "config": knobs, "order": "cache enabled first, then dit_accel"},
            "base": base,
            "note": "composed: base row's step-kind times plus the cache's measured costs",
        }
        cost = self.cache_costs.get(compiled) or self.cache_costs.get(False)
        if cost is None:
            res.update(status="skipped", reason="the step cache's costs were not measured")
            self.add_row(res)
            return
        if cost["compiled"] != compiled:
            res["cache_costs_from"] = "eager measurement"
        try:
            schedule = self.probe(base, cache)
            res["schedule"] = schedule
            kinds = base_res["step_kinds"]
            per_step = [0.0] * self.steps
            segs = []
            by_kind, attn_by_kind = defaultdict(list), defaultdict(list)
            for ctx in self.contexts:
                for kind, start, stop in segments(schedule[ctx]):
                    if kind == "skipped":
                        ms = cost["served_ms_per_call"]
                    elif kind in kinds and kinds[kind]["ms_per_call"] is not None:
                        ms = kinds[kind]["ms_per_call"] + cost["computed_overhead_ms"]
                        if kinds[kind]["attention_ms_per_call"] is not None:
                            attn_by_kind[kind].append(kinds[kind]["attention_ms_per_call"])
                    else:
                        raise RuntimeError(
                            f"{base} has no time for kind {kind!r} (cache schedule, step {start})"
                        )
                    by_kind[kind].append(ms)
                    for s in range(start, stop):
                        per_step[s] += ms
                    segs.append(
                        {
                            "context": ctx,
                            "kind": kind,
                            "start": start,
                            "stop": stop,
                            "ms_per_call": ms,
                            "source": "composed",
                        }
                    )
            if "skipped" in by_kind:
                attn_by_kind["skipped"].append(0.0)
            self._fill(res, schedule, per_step, segs, by_kind, attn_by_kind, compiled)
            res["schedule_verified"] = base_res["schedule_verified"]
            res["output_finite"] = base_res["output_finite"]
            res["status"] = "ok"
            self.results[(res["row"], compiled)] = res
            self._speedups(res)
        except Exception as e:  # noqa: BLE001
            res.update(status="failed", error=f"{type(e).__name__}: {e}")
        self.add_row(res)

    # -- whole-loop check -----------------------------------------------------------------------
    def _check(self, name: str) -> None:
        """A real WanPipeline run of row ``name`` (eager), timed whole, against its composed total."""
        composed = self.results.get((name, False))
        entry = {"row": name, "steps": self.steps}
        if composed is None or self.geom["family"] != "wan":
            return
        base, _, cache = name.partition("+")
        try:
            pipe = _wan_pipeline(self.model)
            cfg = cache_config(cache, self.smoke)[0] if cache else None
            # As the row was timed: cache first, then dit_accel (on the pipeline, as users apply it).
            install(self.model, None, block=self.geom["block"], backend=self.backend, timing=False, cache=cfg)
            knobs = row_knobs(_row(base), self.geom["family"])
            install(pipe, knobs, block=self.geom["block"], backend=self.backend, timing=True)
            text = self.inputs
            g = torch.Generator(device="cpu").manual_seed(0)
            seconds, out = timed_ms(
                lambda: (
                    pipe(
                        prompt_embeds=text["cond"]["encoder_hidden_states"],
                        negative_prompt_embeds=text["uncond"]["encoder_hidden_states"],
                        num_inference_steps=self.steps,
                        guidance_scale=5.0,
                        generator=g,
                        output_type="latent",
                        **self.geom["pipeline_size"],
                    ).frames
                ),
                self.device,
            )
            entry.update(
                pipeline_s=seconds / 1e3,
                composed_s=composed["total_s"],
                rel_diff=seconds / 1e3 / composed["total_s"] - 1.0,
                output_finite=bool(torch.isfinite(out).all()),
            )
            self.log(
                f"[{self.name}] check {name}: pipeline {seconds / 1e3:.2f} s, "
                f"composed {composed['total_s']:.2f} s "
                f"({100 * entry['rel_diff']:+.1f}%)"
            )
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {e}"
        finally:
            uninstall(self.model)
        self.result["checks"].append(entry)
        self.flush()


def _dense_source(row: dict, family: str, compiled: bool) -> str | None:
    """The row whose dense steps a row's dense steps are: ``dense`` for dit_accel rows whose dense steps run
    the stock op through dit_accel's processors, ``dense_fused`` for those that also fuse the blocks (eager:
    compiled blocks run the stock forward, which the compiler fuses); None for stock, the dense rows
    themselves and a row (or preset) with its own dense backend."""
    if row["name"] in ("stock", "dense", "dense_fused"):
        return None
    try:
        knobs = row_knobs(row, family)
    except Skip:
        return None
    if knobs is None or knobs.get("dense_backend", "stock") != "stock":
        return None
    return "dense_fused" if knobs.get("fuse_blocks") and not compiled else "dense"


def _row(name: str) -> dict:
    return next(r for r in ROWS if r["name"] == name)


def _is_block(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 2 and "block" in parts[0] and parts[1].isdigit()


def _wan_pipeline(model):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _match(patterns: str, names: list[str]) -> list[str]:
    out = []
    for p in patterns.split(","):
        hits = fnmatch.filter(names, p.strip())
        if not hits:
            raise SystemExit(f"--rows/--compile-rows: {p!r} matches no row; rows: {names}")
        out += [h for h in hits if h not in out]
    return out


def _schedule_text(kinds: list[str]) -> str:
    counts = Counter(kinds)
    return " + ".join(f"{counts[k]} {k}" for k in dict.fromkeys(kinds))


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
REPORT_BEGIN = "<!-- bench_e2e:begin -->"
REPORT_END = "<!-- bench_e2e:end -->"


def report(paths: list[str]) -> str:
    """Markdown tables of e2e result files: one table per geometry, the kinds table below it."""
    lines = []
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        g = r["geometry"]
        v = r["versions"]
        lines.append(
            f"### {g['name']}: {g['family']}, grid {'x'.join(map(str, g['grid']))} ({g['tokens']:,} tokens), "
            f"{r['steps']} steps, {g['calls_per_step']} call(s) per step"
        )
        lines.append("")
        lines.append(
            f"{r['device']}, {r['dtype']}, torch {v['torch']}, triton {v['triton']}, "
            f"diffusers {v['diffusers']}; "
            f"`{Path(path).name}`. {r['timer']}."
        )
        lines.append("")
        lines.append(
            "| row | compiled | schedule (steps) | s per step by kind | total s | speedup "
            "| vs same-compile stock | non-attention share (sparse) | first-call extra s |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for row in r["rows"]:
            name = row["row"]
            comp = "yes" if row["compiled"] else "no"
            if row["status"] != "ok":
                why = row.get("error") or row.get("reason") or ""
                lines.append(f"| {name} | {comp} | {row['status']}: {_md(why)[:160]} | | | | | | |")
                continue
            kinds = row["step_kinds"]
            sched = " · ".join(f"{k['steps']} {n}" for n, k in kinds.items())
            per = " · ".join(
                f"{n} {k['ms_per_step'] / 1e3:.2f}"
                for n, k in kinds.items()
                if k.get("ms_per_step") is not None
            )
            sparse = next((k for n, k in kinds.items() if "sparse" in n), None)
            share = sparse and sparse.get("non_attention_share")
            first = row.get("first_call_extra_s")
            lines.append(
                f"| {name} | {comp} | {sched} | {per} | {row['total_s']:.1f} | {_x(row.get('speedup'))} "
                f"| {_x(row.get('speedup_vs_same_compile_stock'))} | {_pct(share)} "
                f"| {'-' if first is None else f'{first:.1f}'} |"
            )
        if r.get("checks"):
            lines.append("")
            lines.append("Whole-loop checks (a real pipeline run against the composed total):")
            lines.append("")
            lines.append("| row | pipeline s | composed s | difference |")
            lines.append("|---|---|---|---|")
            for c in r["checks"]:
                if "error" in c:
                    lines.append(f"| {c['row']} | {_md(c['error'])[:120]} | | |")
                else:
                    lines.append(
                        f"| {c['row']} | {c['pipeline_s']:.1f} | {c['composed_s']:.1f} "
                        f"| {100 * c['rel_diff']:+.1f}% |"
                    )
        broken = [row for row in r["rows"] if row.get("graph_breaks")]
        if broken:
            lines.append("")
            lines.append("Graph breaks under regional compilation:")
            lines.append("")
            for row in broken:
                reasons = "; ".join(_md(x)[:120] for x in row.get("graph_break_reasons", [])[:2])
                lines.append(f"- {row['row']}: {row['graph_breaks']} ({reasons})")
        lines.append("")
    return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def write_report(paths: list[str], out: str | None) -> str:
    text = report(paths)
    if out:
        doc = Path(out)
        body = doc.read_text() if doc.exists() else f"{REPORT_BEGIN}\n{REPORT_END}\n"
        if REPORT_BEGIN not in body or REPORT_END not in body:
            raise SystemExit(f"{out} has no {REPORT_BEGIN} ... {REPORT_END} markers")
        head, _, rest = body.partition(REPORT_BEGIN)
        _, _, tail = rest.partition(REPORT_END)
        doc.write_text(f"{head}{REPORT_BEGIN}\n{text}\n{REPORT_END}{tail}")
    return text


# --------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--geometry", help=f"comma-separated: {', '.join(n for n in GEOMETRIES if 'smoke' not in n)}"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny Wan and HunyuanVideo on the CPU, 3 steps")
    parser.add_argument("--rows", help="comma-separated row names or globs (default: the geometry's)")
    parser.add_argument(
        "--compile",
        choices=("default", "on", "off", "only"),
        default="default",
        help="only: the compiled rows, and eager stock if --rows selects it (the speedups' denominator)",
    )
    parser.add_argument("--compile-rows", help="rows also timed compiled (names or globs)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--steps", type=int, help="denoising steps (default 50; smoke 3)")
    parser.add_argument(
        "--repeats", type=int, help="timed calls per visited step (default 3 at 1.3B, else 1)"
    )
    parser.add_argument("--warmup", type=int, help="untimed calls per visited step (default 1)")
    parser.add_argument(
        "--segments-per-kind", type=int, help="runs of a kind timed (default 2 at 1.3B, else 1)"
    )
    parser.add_argument("--no-share-dense", action="store_true", help="time every row's dense steps itself")
    parser.add_argument(
        "--step-cache", choices=("default", "on", "off"), default="default", help="step-cache rows"
    )
    parser.add_argument("--no-check", action="store_true", help="no whole-pipeline checks")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--plan-only", action="store_true", help="print the plan and its time estimate, run nothing"
    )
    parser.add_argument("--report", nargs="*", metavar="JSON", help="print markdown tables of result files")
    parser.add_argument("--report-out", help="with --report: rewrite the marked region of this markdown file")
    args = parser.parse_args(argv)

    if args.report is not None:
        paths = [
            p
            for pat in args.report or [str(Path(args.out_dir) / "e2e_*.json")]
            for p in sorted(glob.glob(pat))
        ]
        print(write_report(paths, args.report_out))
        return {"report": paths}
    smoke_names = [n for n in GEOMETRIES if GEOMETRIES[n].get("smoke")]
    default = ",".join(smoke_names) if args.smoke else ""
    names = [n for n in (args.geometry or default).split(",") if n]
    allowed = smoke_names if args.smoke else [n for n in GEOMETRIES if n not in smoke_names]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        parser.error(f"--geometry: unknown {unknown}; known: {allowed}")
    if not args.smoke and not args.plan_only and not torch.cuda.is_available():
        parser.error("needs a CUDA device (use --smoke on CPU, or --plan-only)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results = {}
    for name in names:
        runner = Runner(name, args, log)
        results[name] = runner.run()
        if not args.plan_only:
            log(f"[{name}] wrote {runner.out_path} ({results[name]['elapsed_s']:.0f} s)")
        del runner
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
