"""Qwen-Image: the joint attention of every double-stream block.

Mirrors ``QwenDoubleStreamAttnProcessor2_0`` (per-stream projections, Q/K norms and RoPE, attention in
(B, S, H, D)). The stock sequence is [text, image] with a text key mask when prompts are padded. Without a
mask the sparse path attends over [text, image] (text first). With a mask that keeps a prefix of the text, the
padding would sit between the valid text and the image; the sparse path then attends over [image, text]
(text last) with ``kv_len`` = image + valid text and restores the stock order of the output.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

from .._diffusers import apply_rotary_emb_qwen, dispatch_attention_fn
from ..tracking import Geometry
from .base import Family, SparseAttnProcessorBase, prefix_lengths

__all__ = ["FAMILY", "QwenImageSparseAttnProcessor"]


class QwenImageSparseAttnProcessor(SparseAttnProcessorBase):
    """Replaces ``QwenDoubleStreamAttnProcessor2_0`` on ``transformer_blocks.*.attn``."""

    stock_class = QwenDoubleStreamAttnProcessor2_0

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        encoder_hidden_states_mask: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")

        if attention_mask is not None:
            raise ValueError(
                "QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                "Pass encoder_hidden_states_mask to let the processor build the joint mask."
            )

        if encoder_hidden_states_mask is not None:
            seq_img = hidden_states.shape[1]
            image_mask = torch.ones(
                (hidden_states.shape[0], seq_img), dtype=torch.bool, device=hidden_states.device
            )
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
            attention_mask = attention_mask[:, None, None, :]

        seq_txt = encoder_hidden_states.shape[1]

        img_query = attn.to_q(hidden_states)
        img_key = attn.to_k(hidden_states)
        img_value = attn.to_v(hidden_states)

        txt_query = attn.add_q_proj(encoder_hidden_states)
        txt_key = attn.add_k_proj(encoder_hidden_states)
        txt_value = attn.add_v_proj(encoder_hidden_states)

        head_dim = attn.inner_dim // attn.heads
        img_query = img_query.unflatten(-1, (-1, head_dim))
        img_key = img_key.unflatten(-1, (-1, head_dim))
        img_value = img_value.unflatten(-1, (-1, head_dim))

        txt_query = txt_query.unflatten(-1, (-1, head_dim))
        txt_key = txt_key.unflatten(-1, (-1, head_dim))
        txt_value = txt_value.unflatten(-1, (-1, head_dim))

        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        def dense():
            return dispatch_attention_fn(
                joint_query,
                joint_key,
                joint_value,
                attn_mask=attention_mask,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )

        mode, n_valid, key_mask = "first", None, None
        seq_img = img_query.shape[1]
        if encoder_hidden_states_mask is not None and torch.compiler.is_compiling():
            # Reading the mask here would break the graph: text goes last and the opaque attention op reads
            # the key mask (kv_len where the text is a prefix, else stock attention with the mask).
            mode = "last"
            text_mask = encoder_hidden_states_mask.to(torch.bool)
            key_mask = torch.cat([text_mask.new_ones(text_mask.shape[0], seq_img), text_mask], dim=1)
        elif encoder_hidden_states_mask is not None:
            n_valid = prefix_lengths(encoder_hidden_states_mask)
            if n_valid is None:
                mode = "masked"
            elif not bool((n_valid == seq_txt).all()):
                mode = "last"
        if mode == "last":
            joint_hidden_states = self._attend(
                torch.cat([img_query, txt_query], dim=1),
                torch.cat([img_key, txt_key], dim=1),
                torch.cat([img_value, txt_value], dim=1),
                layout="bshd",
                dense_fn=lambda: _image_first(dense(), seq_txt),
                kv_len=None if key_mask is not None else n_valid + seq_img,
                text_len=seq_txt,
                text_position="last",
                key_mask=key_mask,
            )
            joint_hidden_states = torch.cat(
                [joint_hidden_states[:, seq_img:], joint_hidden_states[:, :seq_img]], 1
            )
        else:
            joint_hidden_states = self._attend(
                joint_query,
                joint_key,
                joint_value,
                layout="bshd",
                dense_fn=dense,
                text_len=seq_txt,
                text_position="first",
                attention_mask=attention_mask if mode == "masked" else None,
            )

        joint_hidden_states = joint_hidden_states.flatten(2, 3)
        joint_hidden_states = joint_hidden_states.to(joint_query.dtype)

        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]

        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)

        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())

        return img_attn_output, txt_attn_output


def _image_first(out: torch.Tensor, seq_txt: int) -> torch.Tensor:
    return torch.cat([out[:, seq_txt:], out[:, :seq_txt]], dim=1)


def _geometry(transformer, args: dict) -> Geometry:
    tokens = args["hidden_states"].shape[1]
    text = args.get("encoder_hidden_states")
    text_len = int(text.shape[1]) if text is not None else 0
    grid = None
    shapes = args.get("img_shapes")
    if shapes:
        first = shapes[0]
        if isinstance(first, list):
            first = first[0] if len(first) == 1 else None
        if first is not None:
            frames, height, width = (int(x) for x in first)
            if frames * height * width == tokens:
                grid = (frames, height, width)
    return Geometry(grid, text_len, "first" if text_len else None)


FAMILY = Family(
    name="qwenimage",
    transformer_classes=("QwenImageTransformer2DModel",),
    processors={"QwenDoubleStreamAttnProcessor2_0": QwenImageSparseAttnProcessor},
    select=lambda path: path.startswith("transformer_blocks.") and path.endswith(".attn"),
    geometry=_geometry,
    video=False,
)
