"""CogVideoX (1.0 and 1.5, T2V and I2V): the joint attention ``attn1`` of every block.

Mirrors ``CogVideoXAttnProcessor2_0`` and ``FusedCogVideoXAttnProcessor2_0`` (after
``fuse_qkv_projections``). The sequence is [text, video]: text first (226 tokens in the released models);
RoPE covers the video part (on the GPU one Triton pass over q and k, bit-exact with the stock ops:
``kernels.rotary_interleaved``); attention runs in (B, H, S, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from .._diffusers import apply_rotary_emb
from ..tracking import Geometry
from .base import Family, SparseAttnProcessorBase

__all__ = ["FAMILY", "CogVideoXSparseAttnProcessor"]


class CogVideoXSparseAttnProcessor(SparseAttnProcessorBase):
    """Replaces ``(Fused)CogVideoXAttnProcessor2_0`` on ``transformer_blocks.*.attn1``."""

    stock_class = CogVideoXAttnProcessor2_0

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        fused = type(self.stock).__name__.startswith("Fused")
        text_seq_length = encoder_hidden_states.size(1)

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        if fused:
            batch_size, sequence_length, _ = encoder_hidden_states.shape
        else:
            batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if fused:
            qkv = attn.to_qkv(hidden_states)
            split_size = qkv.shape[-1] // 3
            query, key, value = torch.split(qkv, split_size, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            video = slice(text_seq_length, None)
            if attn.is_cross_attention:
                query[:, :, video] = apply_rotary_emb(query[:, :, video], image_rotary_emb)
            else:  # the video tokens of q and k, as (B, S, H, D) views: one fused pass on the GPU
                video_q, video_k = self._rotary_pairs(
                    query[:, :, video].transpose(1, 2), key[:, :, video].transpose(1, 2), image_rotary_emb
                )
                query[:, :, video] = video_q.transpose(1, 2)
                key[:, :, video] = video_k.transpose(1, 2)

        def dense():
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        hidden_states = self._attend(
            query,
            key,
            value,
            layout="bhsd",
            dense_fn=dense,
            text_len=text_seq_length,
            text_position="first",
            attention_mask=attention_mask,
        )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def _geometry(transformer, args: dict) -> Geometry:
    _, frames, _, height, width = args["hidden_states"].shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    text = args.get("encoder_hidden_states")
    text_len = int(text.shape[1]) if text is not None else 0
    return Geometry((frames // (p_t or 1), height // p, width // p), text_len, "first" if text_len else None)


FAMILY = Family(
    name="cogvideox",
    transformer_classes=("CogVideoXTransformer3DModel",),
    processors={
        "CogVideoXAttnProcessor2_0": CogVideoXSparseAttnProcessor,
        "FusedCogVideoXAttnProcessor2_0": CogVideoXSparseAttnProcessor,
    },
    select=lambda path: path.startswith("transformer_blocks.") and path.endswith(".attn1"),
    geometry=_geometry,
    # Radial: HunyuanVideo's knobs by analogy (docs/radial.md). Re-ttention: the paper's CogVideoX-2B
    # schedule (dense 0-14 of 50, refresh every 5).
    defaults={
        "radial": {"decay": 0.95, "sink_frame": False, "dense_layers": (), "dense_steps": 0.25},
        "rettention": {"dense_steps": 0.3, "refresh_every": 5},
    },
)
