"""Cached softmax statistics that correct a sparse attention output (re-ttention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import refresh_statistics

__all__ = ["RESIDUAL_DTYPES", "SoftmaxCorrection", "correction_from_outputs"]

# Storage dtypes of the residual; float8 (e4m3) carries a per-row fp32 scale.
RESIDUAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


@dataclass(frozen=True, eq=False)
class SoftmaxCorrection:
    """What a refresh step leaves for the sparse steps after it.

    With the plan's key set S_i of query row i, full-attention output O_i and in-mask output O_i^S:

    Attributes:
        rho: fp32 [B, H, S_q]: the in-mask share of the softmax mass, exp(LSE_i^S - LSE_i).
        residual: [B, H, S_q, D] (contiguous) in its storage dtype: R_i = O_i - rho_i * O_i^S, the exact
            out-of-mask contribution.
        residual_scale: fp32 [B, H, S_q] per-row scale of a float8 residual (R = stored * scale), else None.
    """

    rho: torch.Tensor
    residual: torch.Tensor
    residual_scale: torch.Tensor | None = None

    def __post_init__(self):
        if self.rho.dim() != 3 or self.rho.dtype != torch.float32:
            raise ValueError(f"rho must be fp32 [B, H, S_q], got {self.rho.dtype} {tuple(self.rho.shape)}")
        if self.residual.dim() != 4 or tuple(self.residual.shape[:3]) != tuple(self.rho.shape):
            raise ValueError(
                f"residual must be [B, H, S_q, D] matching rho {tuple(self.rho.shape)}, got "
                f"{tuple(self.residual.shape)}"
            )
        if self.residual.dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"residual dtype {self.residual.dtype} is not one of {RESIDUAL_DTYPES}")
        fp8 = self.residual.dtype == torch.float8_e4m3fn
        if fp8 != (self.residual_scale is not None):
            raise ValueError("a float8 residual needs residual_scale, and only a float8 residual takes one")
        if self.residual_scale is not None and tuple(self.residual_scale.shape) != tuple(self.rho.shape):
            raise ValueError(f"residual_scale must be [B, H, S_q]={tuple(self.rho.shape)}")
        # The ledger counts a correction's bytes at every store; the tensors' sizes never change.
        object.__setattr__(
            self, "_nbytes", sum(t.numel() * t.element_size() for t in self.tensors().values())
        )

    @property
    def device(self) -> torch.device:
        return self.residual.device

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name (``rho``, ``residual`` and ``residual_scale`` when present)."""
        out = {"rho": self.rho, "residual": self.residual}
        if self.residual_scale is not None:
            out["residual_scale"] = self.residual_scale
        return out

    def nbytes(self) -> int:
        return self._nbytes

    def to(self, device, non_blocking: bool = False) -> SoftmaxCorrection:
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return SoftmaxCorrection(move(self.rho), move(self.residual), move(self.residual_scale))


def correction_from_outputs(
    out: torch.Tensor,
    lse: torch.Tensor,
    out_sparse: torch.Tensor,
    lse_sparse: torch.Tensor,
    *,
    layout: str = "bshd",
    residual_dtype: torch.dtype | None = None,
) -> SoftmaxCorrection:
    """The statistics of a mask from a dense and a sparse pass over the same q, k, v (two passes; the
    refresh kernel does it in one).

    Args:
        out, lse: dense output (``layout``) and its fp32 LSE [B, H, S_q].
        out_sparse, lse_sparse: the same from the sparse pass with the plan whose mask is corrected.
        residual_dtype: storage dtype of R (default the outputs' dtype); float8 gets a per-row scale.
    """
    if layout == "bshd":
        out, out_sparse = out.transpose(1, 2), out_sparse.transpose(1, 2)
    rho, resid, scale = refresh_statistics(
        out.float(), lse, out_sparse.float(), lse_sparse, residual_dtype or out.dtype
    )
    return SoftmaxCorrection(rho.float().contiguous(), resid.contiguous(), scale)
