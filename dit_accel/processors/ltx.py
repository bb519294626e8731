"""LTX-Video: the self-attention ``attn1`` of every block; cross-attention ``attn2`` stays stock.

Mirrors ``LTXVideoAttnProcessor``: Q/K RMS norms and RoPE on the flat (B, S, C) projections, then the head
split, attention in (B, S, H, D). The sequence holds video tokens only; the transformer receives packed
tokens, so the grid comes from its ``num_frames``, ``height`` and ``width`` arguments.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

from .._diffusers import dispatch_attention_fn, ltx_apply_rotary_emb
from ..tracking import Geometry
from .base import Family, SparseAttnProcessorBase

__all__ = ["FAMILY", "LTXSparseAttnProcessor"]


class LTXSparseAttnProcessor(SparseAttnProcessorBase):
    """Replaces ``LTXVideoAttnProcessor`` on ``transformer_blocks.*.attn1``."""

    stock_class = LTXVideoAttnProcessor

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            return self._run_stock(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = ltx_apply_rotary_emb(query, image_rotary_emb)
            key = ltx_apply_rotary_emb(key, image_rotary_emb)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        def dense():
            return dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )

        hidden_states = self._attend(
            query, key, value, layout="bshd", dense_fn=dense, attention_mask=attention_mask
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _geometry(transformer, args: dict) -> Geometry:
    frames, height, width = args.get("num_frames"), args.get("height"), args.get("width")
    if frames is None or height is None or width is None:
        return Geometry(None)
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    grid = (int(frames) // p_t, int(height) // p, int(width) // p)
    return Geometry(grid if grid[0] * grid[1] * grid[2] == args["hidden_states"].shape[1] else None)


FAMILY = Family(
    name="ltx",
    transformer_classes=("LTXVideoTransformer3DModel",),
    processors={"LTXVideoAttnProcessor": LTXSparseAttnProcessor},
    select=lambda path: path.startswith("transformer_blocks.") and path.endswith(".attn1"),
    geometry=_geometry,
    # Radial: Wan's knobs by analogy (docs/radial.md).
    defaults={"radial": {"decay": 0.2, "sink_frame": True, "dense_layers": (0,), "dense_steps": 0.25}},
)
