"""Merging attention computed over disjoint key shards (what ring attention does between its steps).

For a query row i and key shards K_1, ..., K_n that partition the keys, attention over shard r gives
O_i^r = sum_{j in K_r} exp(s_ij - LSE_i^r) v_j and LSE_i^r = log sum_{j in K_r} exp(s_ij). The full row is

    LSE_i = log sum_r exp(LSE_i^r),    O_i = sum_r exp(LSE_i^r - LSE_i) O_i^r.

A shard with no key for row i (a masked tail, or a sparse plan that keeps no block of that shard) has
LSE_i^r = -inf and weight 0; a row with no key in any shard gets O_i = 0 and LSE_i = -inf, as the kernels
return for it (never NaN). The outputs and LSEs are those of ``dense_attention(..., return_lse=True)`` or
``block_sparse_attention(...)``; the sum runs in fp32 and the output comes back in the shards' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["merge_partial_attention"]


def merge_partial_attention(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], layout: str = "bshd"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output and LSE over the union of disjoint key shards, from each shard's output and LSE.

    Args:
        outs: one attention output per key shard, all of one shape: [B, S_q, H, D] for ``layout="bshd"``,
            [B, H, S_q, D] for ``"bhsd"``.
        lses: the matching log-sum-exps, fp32 (or any float dtype) [B, H, S_q]; -inf where a row has no key
            in that shard.

    Returns:
        ``(out, lse)``: the merged output in ``layout`` and the first output's dtype, and the merged fp32
        LSE [B, H, S_q].
    """
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"need one LSE per output and at least one of each, got {len(outs)} and {len(lses)}")
    shape = tuple(outs[0].shape)
    if len(shape) != 4:
        raise ValueError(f"outputs must be 4-D, got {shape}")
    batch, heads, q_len = (shape[0], shape[2], shape[1]) if layout == "bshd" else shape[:3]
    for i, (o, lse) in enumerate(zip(outs, lses)):
        if tuple(o.shape) != shape:
            raise ValueError(f"output {i} has shape {tuple(o.shape)}, output 0 has {shape}")
        if tuple(lse.shape) != (batch, heads, q_len):
            raise ValueError(f"lse {i} must be [B, H, S_q]={[batch, heads, q_len]}, got {tuple(lse.shape)}")
    lse = torch.stack([x.float() for x in lses])  # [n, B, H, S_q]
    top = lse.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lse - top)  # 0 for a shard with no key
    total = weights.sum(0)
    merged_lse = torch.where(total > 0, top + torch.log(total), torch.full_like(top, float("-inf")))
    weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    if layout == "bshd":
        weights = weights.transpose(-1, -2)  # [n, B, S_q, H]
    out = sum(w[..., None] * o.float() for w, o in zip(weights, outs))
    return out.to(outs[0].dtype), merged_lse
