"""The dense method: every call runs the stock diffusers attention op (a baseline and a correctness check)."""

from __future__ import annotations

import torch

from .base import AttentionCall, SparseMethod

__all__ = ["DenseMethod"]


class DenseMethod(SparseMethod):
    """Stock attention everywhere; outputs equal the stock processors'."""

    name = "dense"

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall
    ) -> torch.Tensor:
        return call.run_dense()

    def graph_key(self, info, config) -> str:
        return "dense"
