"""Mochi: the joint attention ``attn1`` of every block (Mochi has no ``set_attn_processor``; the processor is
assigned to ``module.processor``).

Mirrors ``MochiAttnProcessor2_0``. The stock processor loops over the batch and attends over [video, valid
text tokens] per sample, padding each output with zero rows. The sparse path keeps the batch: it moves each
sample's valid text tokens to the front of the text part (a no-op for the usual prefix masks), attends over
[video, text] with ``kv_len`` = video + valid text, and zeroes the rows past it, which is the stock layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from ..tracking import Geometry
from .base import Family, SparseAttnProcessorBase, prefix_lengths

__all__ = ["FAMILY", "MochiSparseAttnProcessor"]


def _apply_rotary_emb(x, freqs_cos, freqs_sin):
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()

    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)

    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiSparseAttnProcessor(SparseAttnProcessorBase):
    """Replaces ``MochiAttnProcessor2_0`` on ``transformer_blocks.*.attn1``."""

    stock_class = MochiAttnProcessor2_0

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
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

        if image_rotary_emb is not None:
            query = _apply_rotary_emb(query, *image_rotary_emb)
            key = _apply_rotary_emb(key, *image_rotary_emb)

        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        encoder_query, encoder_key, encoder_value = (
            encoder_query.transpose(1, 2),
            encoder_key.transpose(1, 2),
            encoder_value.transpose(1, 2),
        )

        sequence_length = query.size(2)
        encoder_sequence_length = encoder_query.size(2)
        total_length = sequence_length + encoder_sequence_length

        batch_size, heads, _, dim = query.shape

        def dense():
            attn_outputs = []
            for idx in range(batch_size):
                mask = attention_mask[idx][None, :]
                valid_prompt_token_indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()

                valid_encoder_query = encoder_query[idx : idx + 1, :, valid_prompt_token_indices, :]
                valid_encoder_key = encoder_key[idx : idx + 1, :, valid_prompt_token_indices, :]
                valid_encoder_value = encoder_value[idx : idx + 1, :, valid_prompt_token_indices, :]

                valid_query = torch.cat([query[idx : idx + 1], valid_encoder_query], dim=2)
                valid_key = torch.cat([key[idx : idx + 1], valid_encoder_key], dim=2)
                valid_value = torch.cat([value[idx : idx + 1], valid_encoder_value], dim=2)

                attn_output = F.scaled_dot_product_attention(
                    valid_query, valid_key, valid_value, dropout_p=0.0, is_causal=False
                )
                valid_sequence_length = attn_output.size(2)
                attn_output = F.pad(attn_output, (0, 0, 0, total_length - valid_sequence_length))
                attn_outputs.append(attn_output)
            return torch.cat(attn_outputs, dim=0)

        text_mask = attention_mask.to(torch.bool)
        # Under torch.compile the valid text tokens are always gathered to the front (the identity for a
        # prefix mask): checking for a prefix would read the mask on the host inside the graph.
        n_valid = None if torch.compiler.is_compiling() else prefix_lengths(text_mask)
        text_qkv = (encoder_query, encoder_key, encoder_value)
        if n_valid is None:
            # valid text tokens first (stock's order); dense() above reads the tensors as they came
            order = torch.argsort((~text_mask).to(torch.int8), dim=1, stable=True)
            index = order[:, None, :, None].expand(-1, heads, -1, dim)
            text_qkv = tuple(torch.gather(t, 2, index) for t in text_qkv)
            n_valid = text_mask.sum(-1, dtype=torch.int32)
        kv_len = n_valid + sequence_length
        joint_query, joint_key, joint_value = (
            torch.cat([x, t], dim=2) for x, t in zip((query, key, value), text_qkv)
        )

        hidden_states = self._attend(
            joint_query,
            joint_key,
            joint_value,
            layout="bhsd",
            dense_fn=dense,
            kv_len=kv_len,
            text_len=encoder_sequence_length,
            text_position="last",
        )
        rows = torch.arange(total_length, device=hidden_states.device)
        keep = rows[None, :] < kv_len[:, None].to(rows.device)
        hidden_states = hidden_states * keep[:, None, :, None].to(hidden_states.dtype)
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3)

        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes(
            (sequence_length, encoder_sequence_length), dim=1
        )

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


def _geometry(transformer, args: dict) -> Geometry:
    _, _, frames, height, width = args["hidden_states"].shape
    p = transformer.config.patch_size
    text = args.get("encoder_hidden_states")
    text_len = int(text.shape[1]) if text is not None else 0
    return Geometry((frames, height // p, width // p), text_len, "last" if text_len else None)


FAMILY = Family(
    name="mochi",
    transformer_classes=("MochiTransformer3DModel",),
    processors={"MochiAttnProcessor2_0": MochiSparseAttnProcessor},
    select=lambda path: path.startswith("transformer_blocks.") and path.endswith(".attn1"),
    geometry=_geometry,
    has_set_attn_processor=False,
    # Radial: HunyuanVideo's knobs by analogy (docs/radial.md).
    defaults={"radial": {"decay": 0.95, "sink_frame": False, "dense_layers": (), "dense_steps": 0.25}},
)
