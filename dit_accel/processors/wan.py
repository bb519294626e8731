"""Wan 2.1 / 2.2 (T2V, I2V, TI2V): the self-attention ``attn1`` of every block; cross-attention stays stock.

Mirrors ``diffusers.models.transformers.transformer_wan.WanAttnProcessor``: (fused) QKV projection, RMS norms
across heads, head split, Wan's interleaved RoPE (on the GPU one Triton pass over q and k, bit-exact with the
stock arithmetic: ``dit_accel.kernels.rotary_interleaved``), attention in (B, S, H, D), output projection.
The sequence holds video tokens only, frame-major.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .._diffusers import dispatch_attention_fn, wan_qkv_projections
from ..tracking import Geometry
from .base import Family, SparseAttnProcessorBase

__all__ = ["FAMILY", "WanSparseAttnProcessor"]


class WanSparseAttnProcessor(SparseAttnProcessorBase):
    """Replaces ``WanAttnProcessor`` on ``blocks.*.attn1``."""

    stock_class = WanAttnProcessor

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            return self._run_stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        query, key, value = wan_qkv_projections(attn, hidden_states, None)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:
            # One pass over q and k on the GPU, bit-exact with the stock processor's eight.
            query, key = self._rotary(query, key, *rotary_emb, convention="wan")

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
        hidden_states = hidden_states.type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _geometry(transformer, args: dict) -> Geometry:
    _, _, frames, height, width = args["hidden_states"].shape
    p_t, p_h, p_w = transformer.config.patch_size
    return Geometry((frames // p_t, height // p_h, width // p_w))


FAMILY = Family(
    name="wan",
    transformer_classes=("WanTransformer3DModel",),
    processors={"WanAttnProcessor": WanSparseAttnProcessor, "WanAttnProcessor2_0": WanSparseAttnProcessor},
    select=lambda path: path.startswith("blocks.") and path.endswith(".attn1"),
    geometry=_geometry,
    # Radial: the reference implementation's Wan knobs (decay 0.2, attention sink, layer 0 dense, 12 of 50
    # warm-up steps). Re-ttention: untuned for Wan (its generic defaults).
    defaults={"radial": {"decay": 0.2, "sink_frame": True, "dense_layers": (0,), "dense_steps": 0.25}},
)
