"""Tiny diffusers transformers and pipelines for offline CPU tests (DESIGN.md Appendix).

``TRANSFORMERS[family]()`` returns ``(transformer, make_inputs)``: ``make_inputs(batch)`` gives forward kwargs
with awkward token counts (never a multiple of the 16-token test blocks) and, where the family pads text, a
padded prompt in the batch. Pipelines are built with ``text_encoder=None`` and take ``prompt_embeds``.
"""

from __future__ import annotations

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

BLOCK = 16


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g):
    return torch.randn(*shape, generator=g)


def _text_mask(batch: int, length: int, valid=(5,)) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b, n in enumerate(valid[:batch]):
        mask[b, n:] = False
    return mask


def wan_transformer(num_layers: int = 2, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def wan():
    model = wan_transformer()

    def inputs(batch, g=None):
        g = g or _gen(1)
        return {
            "hidden_states": _randn(batch, 16, 3, 6, 10, g=g),
            "timestep": torch.tensor([500.0] * batch),
            "encoder_hidden_states": _randn(batch, 8, 32, g=g),
        }

    return model, inputs


def hunyuan_video():
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    ).eval()

    def inputs(batch, g=None):
        g = g or _gen(1)
        return {
            "hidden_states": _randn(batch, 4, 3, 4, 5, g=g),
            "timestep": torch.tensor([500.0] * batch),
            "encoder_hidden_states": _randn(batch, 7, 16, g=g),
            "encoder_attention_mask": _text_mask(batch, 7, valid=(4, 7)),
            "pooled_projections": _randn(batch, 8, g=g),
            "guidance": torch.tensor([3500.0] * batch),
        }

    return model, inputs


def cogvideox():
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=2,
        sample_width=10,
        sample_height=6,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=7,
    ).eval()

    def inputs(batch, g=None):
        g = g or _gen(1)
        return {
            "hidden_states": _randn(batch, 3, 4, 6, 10, g=g),
            "encoder_hidden_states": _randn(batch, 7, 32, g=g),
            "timestep": torch.tensor([500] * batch),
        }

    return model, inputs


def ltx():
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    ).eval()

    def inputs(batch, g=None):
        g = g or _gen(1)
        return {
            "hidden_states": _randn(batch, 3 * 4 * 5, 8, g=g),
            "encoder_hidden_states": _randn(batch, 7, 32, g=g),
            "timestep": torch.tensor([500] * batch),
            "encoder_attention_mask": _text_mask(batch, 7, valid=(5, 7)).long(),
            "num_frames": 3,
            "height": 4,
            "width": 5,
        }

    return model, inputs


def mochi():
    torch.manual_seed(0)
    model = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=16,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    ).eval()

    def inputs(batch, g=None):
        g = g or _gen(1)
        return {
            "hidden_states": _randn(batch, 4, 3, 8, 10, g=g),
            "encoder_hidden_states": _randn(batch, 7, 16, g=g),
            "timestep": torch.tensor([500] * batch),
            "encoder_attention_mask": _text_mask(batch, 7, valid=(4, 7)),
        }

    return model, inputs


def flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    ).eval()

    def inputs(batch, g=None, height=6, width=7):
        g = g or _gen(1)
        ids = torch.zeros(height, width, 3)
        ids[..., 1] = torch.arange(height)[:, None]
        ids[..., 2] = torch.arange(width)[None, :]
        return {
            "hidden_states": _randn(batch, height * width, 4, g=g),
            "encoder_hidden_states": _randn(batch, 9, 32, g=g),
            "pooled_projections": _randn(batch, 32, g=g),
            "timestep": torch.tensor([0.5] * batch),
            "img_ids": ids.reshape(-1, 3),
            "txt_ids": torch.zeros(9, 3),
        }

    return model, inputs


def sd3():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=96,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()

    def inputs(batch, g=None):
        g = g or _gen(1)
        return {
            "hidden_states": _randn(batch, 4, 6, 7, g=g),
            "encoder_hidden_states": _randn(batch, 9, 32, g=g),
            "pooled_projections": _randn(batch, 64, g=g),
            "timestep": torch.tensor([500] * batch),
        }

    return model, inputs


def pixart():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()

    def inputs(batch, g=None):
        g = g or _gen(1)
        return {
            "hidden_states": _randn(batch, 4, 12, 14, g=g),
            "encoder_hidden_states": _randn(batch, 9, 32, g=g),
            "timestep": torch.tensor([500] * batch),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    return model, inputs


def qwenimage():
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    ).eval()

    def inputs(batch, g=None):
        g = g or _gen(1)
        return {
            "hidden_states": _randn(batch, 6 * 7, 16, g=g),
            "encoder_hidden_states": _randn(batch, 9, 16, g=g),
            "encoder_hidden_states_mask": _text_mask(batch, 9, valid=(6, 9)),
            "timestep": torch.tensor([0.5] * batch),
            "img_shapes": [[(1, 6, 7)]] * batch,
        }

    return model, inputs


TRANSFORMERS = {
    "wan": wan,
    "hunyuan_video": hunyuan_video,
    "cogvideox": cogvideox,
    "ltx": ltx,
    "mochi": mochi,
    "flux": flux,
    "sd3": sd3,
    "pixart": pixart,
    "qwenimage": qwenimage,
}


def _latent(**kw):
    return {"output_type": "latent", **kw}


def wan_pipeline(two_experts: bool = False, scheduler=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=wan_transformer(seed=0),
        vae=None,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer_2=wan_transformer(seed=1) if two_experts else None,
        boundary_ratio=0.5 if two_experts else None,
    )


def run_wan(pipe, steps=3, height=48, width=80, frames=9, guidance=5.0, videos_per_prompt=1, seed=0):
    g = _gen(seed)
    return pipe(
        prompt_embeds=_randn(1, 8, 32, g=g),
        negative_prompt_embeds=_randn(1, 8, 32, g=g),
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_videos_per_prompt=videos_per_prompt,
        generator=_gen(seed),
        **_latent(),
    ).frames


def cogvideox_pipeline():
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    model, _ = cogvideox()
    return CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=CogVideoXDDIMScheduler()
    )


def run_cogvideox(pipe, steps=3, prompts=1, guidance=6.0, seed=0):
    g = _gen(seed)
    return pipe(
        prompt_embeds=_randn(prompts, 7, 32, g=g),
        negative_prompt_embeds=_randn(prompts, 7, 32, g=g),
        height=48,
        width=80,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=_gen(seed),
        **_latent(),
    ).frames


def sd3_pipeline(scheduler=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    model, _ = sd3()
    return StableDiffusion3Pipeline(
        transformer=model,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def run_sd3(pipe, steps=3, prompts=1, height=48, width=56, guidance=5.0, seed=0):
    g = _gen(seed)
    return pipe(
        prompt_embeds=_randn(prompts, 9, 32, g=g),
        negative_prompt_embeds=_randn(prompts, 9, 32, g=g),
        pooled_prompt_embeds=_randn(prompts, 64, g=g),
        negative_pooled_prompt_embeds=_randn(prompts, 64, g=g),
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=_gen(seed),
        **_latent(),
    ).images


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )


def run_flux(pipe, steps=3, true_cfg=1.0, seed=0):
    g = _gen(seed)
    extra = {}
    if true_cfg > 1.0:
        extra = {
            "negative_prompt_embeds": _randn(1, 9, 32, g=g),
            "negative_pooled_prompt_embeds": _randn(1, 32, g=g),
            "true_cfg_scale": true_cfg,
        }
    return pipe(
        prompt_embeds=_randn(1, 9, 32, g=g),
        pooled_prompt_embeds=_randn(1, 32, g=g),
        height=48,
        width=64,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=_gen(seed),
        **extra,
        **_latent(),
    ).images


def pixart_pipeline():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    model, _ = pixart()
    return PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=model,
        scheduler=DPMSolverMultistepScheduler(),
    )


def run_pixart(pipe, steps=3, guidance=4.5, seed=0):
    g = _gen(seed)
    return pipe(
        negative_prompt=None,
        prompt_embeds=_randn(1, 9, 32, g=g),
        prompt_attention_mask=torch.ones(1, 9),
        negative_prompt_embeds=_randn(1, 9, 32, g=g),
        negative_prompt_attention_mask=torch.ones(1, 9),
        height=96,
        width=112,
        num_inference_steps=steps,
        guidance_scale=guidance,
        use_resolution_binning=False,
        generator=_gen(seed),
        **_latent(),
    ).images


class Recorder:
    """A method that records what each attention call sees and runs stock attention."""

    def __new__(cls):
        from dit_accel.methods import SparseMethod

        class _Recorder(SparseMethod):
            name = "recorder"

            def __init__(self):
                super().__init__()
                self.calls = []

            def attention(self, q, k, v, call):
                info = call.info
                self.calls.append(
                    {
                        "component": info.component,
                        "context": info.context,
                        "step": info.step,
                        "num_steps": info.num_steps,
                        "run": info.run,
                        "batch": info.batch,
                        "cfg": info.cfg,
                        "grid": info.grid,
                        "layer": call.layer,
                        "layer_index": call.layer_index,
                        "q_len": call.q_len,
                        "k_len": call.k_len,
                        "text_len": call.text_len,
                        "text_position": call.text_position,
                        "kv_len": None if call.kv_len is None else call.kv_len.tolist(),
                        "layout": call.layout,
                    }
                )
                return call.run_dense()

        return _Recorder()


def steps_by_context(calls, layer_index=0):
    """{context: [step of each forward]} from a Recorder's calls, one entry per forward (first layer)."""
    out = {}
    for c in calls:
        if c["layer_index"] == layer_index and c["component"] in ("transformer",):
            out.setdefault(c["context"], []).append(c["step"])
    return out
