"""Wan 2.1 / 2.2 (T2V, I2V, TI2V): the self-attention ``attn1`` of every block; cross-attention stays stock.

Mirrors ``diffusers.models.transformers.transformer_wan.WanAttnProcessor``: (fused) QKV projection, RMS norms
across heads, head split, Wan's interleaved RoPE (on the GPU one Triton pass over q and k, bit-exact with the
stock arithmetic: ``dit_accel.kernels.rotary_interleaved``), attention in (B, S, H, D), output projection.
The sequence holds video tokens only, frame-major.
"""

from __future__ import annotations

import torch
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanTransformerBlock

from .._diffusers import dispatch_attention_fn, wan_qkv_projections
from ..kernels import block_step
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


def fused_block_forward(
    block: WanTransformerBlock,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    rotary_emb: torch.Tensor,
) -> torch.Tensor:
    """``WanTransformerBlock.forward`` with the elementwise work between its attention and feed-forward calls
    done by ``dit_accel.kernels.block_step``, one pass per step (stock runs each as several eager ops over
    the hidden states): the norms and modulations, the gated residuals and the cross-attention's residual.
    Same arithmetic; the LayerNorms' output may differ in the last bit. Wan 2.2 TI2V's per-token
    modulation (4-d ``temb``), and a norm whose weights are not on the hidden states' device (leaf-level
    group offloading places them when the norm module is called), run the stock forward."""
    norm2_weight = getattr(block.norm2, "weight", None)
    if temb.ndim == 4 or (norm2_weight is not None and norm2_weight.device != hidden_states.device):
        # TI2V; or norm2's weights not placed yet (leaf-level offloading onloads them when norm2 is called)
        return WanTransformerBlock.forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb)
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
        block.scale_shift_table + temb.float()
    ).chunk(6, dim=1)
    eps1, eps3 = block.norm1.eps, block.norm3.eps
    # 1. Self-attention
    _, norm_hidden_states = block_step(
        hidden_states, norm="modulate", scale=scale_msa, shift=shift_msa, eps=eps1
    )
    attn_output = block.attn1(norm_hidden_states, None, None, rotary_emb)
    # 2. Cross-attention
    if isinstance(block.norm2, FP32LayerNorm):
        n2 = dict(norm="affine", weight=block.norm2.weight, bias=block.norm2.bias, eps=block.norm2.eps)
    else:  # nn.Identity: the residual's result is the input
        n2 = {}
    hidden_states, norm_hidden_states = block_step(
        hidden_states, attn_output, gate_msa, residual="gated", **n2
    )
    attn_output = block.attn2(norm_hidden_states if n2 else hidden_states, encoder_hidden_states, None, None)
    # 3. Feed-forward
    hidden_states, norm_hidden_states = block_step(
        hidden_states,
        attn_output,
        residual="add",
        norm="modulate",
        scale=c_scale_msa,
        shift=c_shift_msa,
        eps=eps3,
    )
    ff_output = block.ffn(norm_hidden_states)
    hidden_states, _ = block_step(hidden_states, ff_output, c_gate_msa, residual="gated")
    return hidden_states


def _fused_blocks(transformer) -> list:
    """Wan's blocks whose norms are the stock ones (FP32LayerNorm without affine around self-attention and
    feed-forward; FP32LayerNorm with affine or Identity before cross-attention)."""
    out = []
    for path, block in transformer.named_modules():
        if type(block) is not WanTransformerBlock:
            continue
        plain = all(type(n) is FP32LayerNorm and n.weight is None for n in (block.norm1, block.norm3))
        norm2 = block.norm2
        if plain and (
            type(norm2) is torch.nn.Identity
            or (type(norm2) is FP32LayerNorm and norm2.weight is not None and norm2.bias is not None)
        ):
            out.append((path, block, fused_block_forward))
    return out


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
    fused_blocks=_fused_blocks,
)
