"""Tiny diffusers pipelines of every supported family, with VAEs, for offline CPU tests of
``dit_accel.pipelines`` (DESIGN.md Appendix).

``PIPELINES[name]()`` returns ``(pipe, call)``: a stock pipeline whose transformer is one of
``tests/_tiny.py``'s configurations (or the smallest one the pipeline accepts) and a dict of the pipeline's
own call arguments that renders decoded output (``prompt_embeds`` instead of a text encoder; a few steps;
frames of at least 16x16 pixels so SSIM's 11-pixel window fits). Image families return ``.images``, video
families ``.frames``.
"""

from __future__ import annotations

import _tiny
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanVideoPipeline,
    LTXPipeline,
    MochiPipeline,
    PixArtAlphaPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

STEPS = 3


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _eval(*modules):
    for m in modules:
        m.eval()


def _wan_vae():
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def _wan_call(frames=9, height=64, width=96):
    return {
        "prompt_embeds": _randn(1, 8, 32, seed=1),
        "negative_prompt_embeds": _randn(1, 8, 32, seed=2),
        "num_frames": frames,
        "height": height,
        "width": width,
        "num_inference_steps": STEPS,
        "guidance_scale": 5.0,
    }


def wan():
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=_tiny.wan_transformer(seed=0),
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    return pipe, _wan_call()


def wan22():
    """Wan 2.2 text-to-video: two experts switched at ``boundary_ratio``."""
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        transformer=_tiny.wan_transformer(seed=0),
        transformer_2=_tiny.wan_transformer(seed=1),
        boundary_ratio=0.5,
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    return pipe, _wan_call()


def _wan_i2v_transformer(seed, image_dim=None):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        image_dim=image_dim,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def _image(seed):
    from PIL import Image

    pixels = (_randn(64, 96, 3, seed=seed).clamp(-1, 1) * 127.5 + 127.5).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def wan21_i2v():
    """Wan 2.1 image-to-video: one transformer, a CLIP image encoder for the image embedding."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=4,
            projection_dim=4,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            intermediate_size=16,
            patch_size=1,
        )
    ).eval()
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        image_encoder=encoder,
        image_processor=CLIPImageProcessor(crop_size=32, size=32),
        transformer=_wan_i2v_transformer(0, image_dim=4),
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    return pipe, {**_wan_call(), "image": _image(3)}


def wan22_i2v():
    """Wan 2.2 image-to-video (A14B layout): two experts, no image encoder, the image as latent condition."""
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        image_encoder=None,
        image_processor=None,
        transformer=_wan_i2v_transformer(0),
        transformer_2=_wan_i2v_transformer(1),
        boundary_ratio=0.5,
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    return pipe, {**_wan_call(), "image": _image(3)}


def hunyuan_video():
    model, _ = _tiny.hunyuan_video()
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=model,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    mask = torch.ones(1, 7, dtype=torch.bool)
    mask[0, 5:] = False
    call = {
        "prompt_embeds": _randn(1, 7, 16, seed=1),
        "pooled_prompt_embeds": _randn(1, 8, seed=2),
        "prompt_attention_mask": mask,
        "num_frames": 9,
        "height": 32,
        "width": 48,
        "num_inference_steps": STEPS,
        "guidance_scale": 6.0,
    }
    return pipe, call


def cogvideox():
    model, _ = _tiny.cogvideox()
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    ).eval()
    pipe = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=vae, transformer=model, scheduler=CogVideoXDDIMScheduler()
    )
    call = {
        "prompt_embeds": _randn(1, 7, 32, seed=1),
        "negative_prompt_embeds": _randn(1, 7, 32, seed=2),
        "num_frames": 9,
        "height": 48,
        "width": 80,
        "num_inference_steps": STEPS,
        "guidance_scale": 6.0,
    }
    return pipe, call


def ltx():
    model, _ = _tiny.ltx()
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=model,
    )
    mask = torch.ones(1, 7, dtype=torch.long)
    call = {
        "prompt_embeds": _randn(1, 7, 32, seed=1),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": _randn(1, 7, 32, seed=2),
        "negative_prompt_attention_mask": mask,
        "num_frames": 9,
        "height": 32,
        "width": 64,
        "num_inference_steps": STEPS,
        "guidance_scale": 3.0,
    }
    return pipe, call


def mochi():
    torch.manual_seed(0)
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=16,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=model,
    )
    mask = torch.ones(1, 7, dtype=torch.long)
    mask[0, 5:] = 0
    call = {
        "prompt_embeds": _randn(1, 7, 16, seed=1),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": _randn(1, 7, 16, seed=2),
        "negative_prompt_attention_mask": torch.ones(1, 7, dtype=torch.long),
        "num_frames": 7,
        "height": 64,
        "width": 96,
        "num_inference_steps": STEPS,
        "guidance_scale": 4.5,
    }
    return pipe, call


def _image_vae(latent_channels):
    torch.manual_seed(0)
    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


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
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_image_vae(1),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )
    call = {
        "prompt_embeds": _randn(1, 9, 32, seed=1),
        "pooled_prompt_embeds": _randn(1, 32, seed=2),
        "height": 24,
        "width": 32,
        "num_inference_steps": STEPS,
        "guidance_scale": 3.5,
    }
    return pipe, call


def sd3():
    model, _ = _tiny.sd3()
    pipe = StableDiffusion3Pipeline(
        transformer=model,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_image_vae(4),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    call = {
        "prompt_embeds": _randn(1, 9, 32, seed=1),
        "negative_prompt_embeds": _randn(1, 9, 32, seed=2),
        "pooled_prompt_embeds": _randn(1, 64, seed=3),
        "negative_pooled_prompt_embeds": _randn(1, 64, seed=4),
        "height": 16,
        "width": 24,
        "num_inference_steps": STEPS,
        "guidance_scale": 5.0,
    }
    return pipe, call


def pixart():
    model, _ = _tiny.pixart()
    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_image_vae(4),
        transformer=model,
        scheduler=DPMSolverMultistepScheduler(),
    )
    call = {
        "negative_prompt": None,
        "prompt_embeds": _randn(1, 9, 32, seed=1),
        "prompt_attention_mask": torch.ones(1, 9),
        "negative_prompt_embeds": _randn(1, 9, 32, seed=2),
        "negative_prompt_attention_mask": torch.ones(1, 9),
        "height": 24,
        "width": 32,
        "num_inference_steps": STEPS,
        "guidance_scale": 4.5,
        "use_resolution_binning": False,
    }
    return pipe, call


def qwenimage():
    model, _ = _tiny.qwenimage()
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=model,
    )
    mask = torch.ones(1, 9, dtype=torch.long)
    mask[0, 6:] = 0
    call = {
        "prompt_embeds": _randn(1, 9, 16, seed=1),
        "prompt_embeds_mask": mask,
        "negative_prompt_embeds": _randn(1, 9, 16, seed=2),
        "negative_prompt_embeds_mask": torch.ones(1, 9, dtype=torch.long),
        "true_cfg_scale": 4.0,
        "height": 64,
        "width": 64,
        "num_inference_steps": STEPS,
    }
    return pipe, call


# name -> builder; the name is the family for presets except the Wan variants ("wan" for all three).
PIPELINES = {
    "wan": wan,
    "wan22": wan22,
    "wan21_i2v": wan21_i2v,
    "wan22_i2v": wan22_i2v,
    "hunyuan_video": hunyuan_video,
    "cogvideox": cogvideox,
    "ltx": ltx,
    "mochi": mochi,
    "flux": flux,
    "sd3": sd3,
    "pixart": pixart,
    "qwenimage": qwenimage,
}
FAMILY = {name: "wan" if name.startswith("wan") else name for name in PIPELINES}


# ---------------------------------------------------------------- pipelines that take text prompts

WORDS = "a large small red blue green circle square moving left right on black gray background".split()


def flux_with_text():
    """A tiny FluxPipeline with its CLIP and T5 text encoders and in-memory tokenizers: it takes ``prompt``
    strings, so it can be saved with ``save_pretrained`` and rendered by ``dit-accel render --model``."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    pipe, _ = flux()
    clip_vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 1,
        **{f"{w}</w>": i + 2 for i, w in enumerate(WORDS)},
    }
    end = "<|endoftext|>"
    pipe.tokenizer = CLIPTokenizer(
        vocab=clip_vocab,
        merges=[],
        unk_token=end,
        bos_token="<|startoftext|>",
        eos_token=end,
        pad_token=end,
        model_max_length=77,
    )
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{w}", -1.0) for w in WORDS)]
    pipe.tokenizer_2 = T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=16)
    torch.manual_seed(0)
    pipe.text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(clip_vocab),
            projection_dim=32,
        )
    ).eval()
    pipe.text_encoder_2 = T5EncoderModel(
        T5Config(
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            vocab_size=len(t5_vocab),
            relative_attention_num_buckets=8,
        )
    ).eval()
    pipe.register_modules(
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
    )
    return pipe


def wan_with_text():
    """The embedded model's CPU-sized configuration (``SMOKE_CONFIG``), untrained: a WanPipeline with its
    UMT5 text encoder and word-level tokenizer."""
    from dit_accel.pipelines.tiny_video import model

    return model.build_pipeline(model.build_components(model.SMOKE_CONFIG, seed=0))
