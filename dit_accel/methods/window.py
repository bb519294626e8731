"""The window method: a band of key blocks around each query block's diagonal, plus all text.

Query block p (tokens [p*block_q, (p+1)*block_q)) keeps the key blocks c with |c - c_p| <= w, where c_p is the
key block holding the query block's centre and w = round((density * n_kblocks - 1) / 2), at least 0. Every
query keeps all text key blocks and text query blocks keep every key block (DESIGN.md §4). At density >= 1 the
plan is full. The pattern ignores the latent grid: it exists to prove the plumbing, not to preserve quality.
"""

from __future__ import annotations

import torch

from ..kernels import BlockPlan
from ..kernels.plan import num_blocks
from .base import AttentionCall, SparseMethod

__all__ = ["WindowMethod", "window_block_mask"]


def window_block_mask(
    q_len: int,
    k_len: int,
    block_q: int,
    block_k: int,
    density: float,
    text_len: int = 0,
    text_position: str | None = None,
    device=None,
) -> torch.Tensor:
    """Boolean block mask [n_qblocks, n_kblocks] of the window pattern (see the module docstring)."""
    n_qb, n_kb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    if density >= 1.0:
        return torch.ones(n_qb, n_kb, dtype=torch.bool, device=device)
    w = max(0, round((density * n_kb - 1) / 2))
    centre = ((torch.arange(n_qb, device=device) * block_q + block_q // 2) // block_k).clamp(max=n_kb - 1)
    cols = torch.arange(n_kb, device=device)
    mask = (cols[None, :] - centre[:, None]).abs() <= w
    if text_len > 0 and text_position == "first":
        mask[:, : num_blocks(text_len, block_k)] = True
        mask[: num_blocks(text_len, block_q)] = True
    elif text_len > 0 and text_position == "last":
        mask[:, (k_len - text_len) // block_k :] = True
        mask[(q_len - text_len) // block_q :] = True
    return mask


class WindowMethod(SparseMethod):
    """Banded block-sparse attention at a target density.

    Args:
        density: fraction of key blocks each (non-text) query block keeps, in (0, 1].
    """

    name = "window"

    def __init__(self, density: float = 0.1):
        super().__init__()
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"window density must lie in (0, 1], got {density!r}")
        self.density = float(density)

    def plan_for(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> BlockPlan:
        bq, bk = call.config.block_q, call.config.block_k
        mask = window_block_mask(
            call.q_len, call.k_len, bq, bk, self.density, call.text_len, call.text_position, device=q.device
        )
        return BlockPlan.from_block_mask(mask[None, None], bq, bk)
