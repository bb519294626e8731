"""Flux.1 (dev, schnell, Kontext): the joint attention of the dual-stream and single-stream blocks.

Mirrors ``FluxAttnProcessor`` (separate or fused projections, Q/K RMS norms, RoPE over the whole joint
sequence, attention in (B, S, H, D)). The sequence is [text, image]: text first (512 tokens for Flux.1-dev).
Dual blocks see the text stream as ``encoder_hidden_states``; single blocks get the joint sequence without a
text length, which the step tracker supplies (the length of the transformer's ``encoder_hidden_states``).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from .._diffusers import dispatch_attention_fn, flux_qkv_projections
from ..tracking import Geometry
from .base import Family, SparseAttnProcessorBase

__all__ = ["FAMILY", "FluxSparseAttnProcessor"]


class FluxSparseAttnProcessor(SparseAttnProcessorBase):
    """Replaces ``FluxAttnProcessor`` on ``(single_)transformer_blocks.*.attn``."""

    stock_class = FluxAttnProcessor

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query, key, value, encoder_query, encoder_key, encoder_value = flux_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query, key = self._rotary_pairs(query, key, image_rotary_emb)

        def dense():
            return dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )

        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text_len, text_position = encoder_hidden_states.shape[1], "first"
        else:
            text_len, text_position = None, None
        hidden_states = self._attend(
            query,
            key,
            value,
            layout="bshd",
            dense_fn=dense,
            text_len=text_len,
            text_position=text_position,
            attention_mask=attention_mask,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


def _geometry(transformer, args: dict) -> Geometry:
    tokens = args["hidden_states"].shape[1]
    text = args.get("encoder_hidden_states")
    text_len = int(text.shape[1]) if text is not None else 0
    grid = None
    ids = args.get("img_ids")
    if isinstance(ids, torch.Tensor) and ids.shape[-1] == 3:
        ids = ids.reshape(-1, 3)[-tokens:]
        frames, height, width = (int(x) for x in (ids.amax(0) - ids.amin(0) + 1).tolist())
        if frames == 1 and height * width == tokens:
            grid = (1, height, width)
    return Geometry(grid, text_len, "first" if text_len else None)


def _select(path: str) -> bool:
    return (path.startswith("transformer_blocks.") or path.startswith("single_transformer_blocks.")) and (
        path.endswith(".attn")
    )


FAMILY = Family(
    name="flux",
    transformer_classes=("FluxTransformer2DModel",),
    processors={
        "FluxAttnProcessor": FluxSparseAttnProcessor,
        "FluxAttnProcessor2_0": FluxSparseAttnProcessor,
    },
    select=_select,
    geometry=_geometry,
    video=False,
)
