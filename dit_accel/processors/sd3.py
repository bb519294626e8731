"""Stable Diffusion 3 / 3.5: the joint attention ``attn`` of every block and SD3.5's image-only ``attn2``.

Mirrors ``JointAttnProcessor2_0`` (Q/K norms of SD3.5, attention in (B, H, S, D)). The joint sequence is
[image, text]: text last (333 tokens: 77 CLIP + 256 T5). ``attn2`` (dual-attention layers) attends over the
image tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0

from ..tracking import Geometry
from .base import Family, SparseAttnProcessorBase

__all__ = ["FAMILY", "SD3SparseAttnProcessor"]


class SD3SparseAttnProcessor(SparseAttnProcessorBase):
    """Replaces ``JointAttnProcessor2_0`` on ``transformer_blocks.*.attn`` and ``.attn2``."""

    stock_class = JointAttnProcessor2_0

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        residual = hidden_states

        batch_size = hidden_states.shape[0]

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

        text_len = 0
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
            encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
            encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)

            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)

            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)

        def dense():
            return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

        hidden_states = self._attend(
            query,
            key,
            value,
            layout="bhsd",
            dense_fn=dense,
            text_len=text_len,
            text_position="last" if text_len else None,
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


def _geometry(transformer, args: dict) -> Geometry:
    _, _, height, width = args["hidden_states"].shape
    p = transformer.config.patch_size
    text = args.get("encoder_hidden_states")
    text_len = int(text.shape[1]) if text is not None else 0
    return Geometry((1, height // p, width // p), text_len, "last" if text_len else None)


FAMILY = Family(
    name="sd3",
    transformer_classes=("SD3Transformer2DModel",),
    processors={"JointAttnProcessor2_0": SD3SparseAttnProcessor},
    select=lambda path: (
        path.startswith("transformer_blocks.") and (path.endswith(".attn") or path.endswith(".attn2"))
    ),
    geometry=_geometry,
    video=False,
)
