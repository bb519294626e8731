"""HunyuanVideo: joint attention of the dual-stream and single-stream blocks; the token refiner stays stock.

Mirrors ``HunyuanVideoAttnProcessor2_0``. The sequence is [video, text]: text last, padded to a fixed length
with a boolean key mask [B, 1, 1, N] that keeps a prefix; the sparse path passes it as ``kv_len`` (valid keys
per batch element) instead of a dense mask. RoPE covers the video part only (on the GPU one Triton pass over
q and k that also copies the text suffix, bit-exact with the stock ops: ``kernels.rotary_interleaved``).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from .._diffusers import dispatch_attention_fn
from ..tracking import Geometry
from .base import Family, SparseAttnProcessorBase

__all__ = ["FAMILY", "HunyuanVideoSparseAttnProcessor"]


class HunyuanVideoSparseAttnProcessor(SparseAttnProcessorBase):
    """Replaces ``HunyuanVideoAttnProcessor2_0`` on ``transformer_blocks.*.attn`` and
    ``single_transformer_blocks.*.attn``."""

    stock_class = HunyuanVideoAttnProcessor2_0

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            # The video tokens only; in the single-stream blocks the text follows them and is copied as is.
            single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
            text = encoder_hidden_states.shape[1] if single_stream else 0
            query, key = self._rotary_pairs(query, key, image_rotary_emb, query.shape[1] - text)

        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)

            encoder_query = encoder_query.unflatten(2, (attn.heads, -1))
            encoder_key = encoder_key.unflatten(2, (attn.heads, -1))
            encoder_value = encoder_value.unflatten(2, (attn.heads, -1))

            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

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

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        key_mask, unexpressed = None, None
        if attention_mask is not None:
            mask = attention_mask
            if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1:3] == (1, 1):
                key_mask = mask[:, 0, 0]  # the model's padded-text key mask: kv_len where it is a prefix
            else:
                unexpressed = attention_mask
        hidden_states = self._attend(
            query,
            key,
            value,
            layout="bshd",
            dense_fn=dense,
            text_len=text_len,
            text_position="last" if text_len else None,
            attention_mask=unexpressed,
            key_mask=key_mask,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1] :],
            )

            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)

            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


def _geometry(transformer, args: dict) -> Geometry:
    _, _, frames, height, width = args["hidden_states"].shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    text = args.get("encoder_hidden_states")
    text_len = int(text.shape[1]) if text is not None else 0
    return Geometry((frames // p_t, height // p, width // p), text_len, "last" if text_len else None)


def _select(path: str) -> bool:
    return (path.startswith("transformer_blocks.") or path.startswith("single_transformer_blocks.")) and (
        path.endswith(".attn")
    )


FAMILY = Family(
    name="hunyuan_video",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    processors={"HunyuanVideoAttnProcessor2_0": HunyuanVideoSparseAttnProcessor},
    select=_select,
    geometry=_geometry,
    # Radial: the reference implementation's HunyuanVideo knobs (decay 0.95, no sink, 12 of 50 warm-up steps).
    defaults={"radial": {"decay": 0.95, "sink_frame": False, "dense_layers": (), "dense_steps": 0.25}},
)
