"""PixArt-α / PixArt-Σ: the self-attention ``attn1`` of every block; cross-attention ``attn2`` stays stock.

Mirrors ``AttnProcessor2_0`` (the generic diffusers processor) for self-attention: optional spatial and group
norms, 4-D inputs, attention in (B, H, S, D), residual connection and output rescaling. Image tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from ..tracking import Geometry
from .base import Family, SparseAttnProcessorBase

__all__ = ["FAMILY", "PixArtSparseAttnProcessor"]


class PixArtSparseAttnProcessor(SparseAttnProcessorBase):
    """Replaces ``AttnProcessor2_0`` on ``transformer_blocks.*.attn1``."""

    stock_class = AttnProcessor2_0

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or len(args) > 0 or kwargs.get("scale", None) is not None:
            return self._run_stock(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim

        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

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

        def dense():
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )

        hidden_states = self._attend(
            query, key, value, layout="bhsd", dense_fn=dense, attention_mask=attention_mask
        )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states


def _geometry(transformer, args: dict) -> Geometry:
    _, _, height, width = args["hidden_states"].shape
    p = transformer.config.patch_size
    return Geometry((1, height // p, width // p))


FAMILY = Family(
    name="pixart",
    transformer_classes=("PixArtTransformer2DModel",),
    processors={"AttnProcessor2_0": PixArtSparseAttnProcessor},
    select=lambda path: path.startswith("transformer_blocks.") and path.endswith(".attn1"),
    geometry=_geometry,
    video=False,
    # Re-ttention: the paper's PixArt schedule (20 steps: dense 0-4, refresh at 5, 10, 15).
    defaults={"rettention": {"dense_steps": 0.25, "refresh_every": 5}},
)
