"""dit_accel.kernels: block-sparse attention kernels (Triton) and their pure-torch references.

Public: :class:`BlockPlan`, :class:`SoftmaxCorrection`, :func:`block_sparse_attention`,
:func:`dense_attention`, :func:`block_mass`, :func:`refresh_attention`, :func:`mask_statistics`,
:func:`correction_from_outputs`, :func:`merge_partial_attention`, :func:`rotary_interleaved`,
:func:`block_step`.
This package imports only torch and triton; ``xformers_attention`` imports xformers lazily, for its backend.
"""

from .correction import SoftmaxCorrection, correction_from_outputs
from .merge import merge_partial_attention
from .ops import (
    block_mass,
    block_sparse_attention,
    block_step,
    dense_attention,
    mask_statistics,
    refresh_attention,
    rotary_interleaved,
)
from .plan import BlockPlan

__all__ = [
    "BlockPlan",
    "SoftmaxCorrection",
    "block_mass",
    "block_sparse_attention",
    "block_step",
    "correction_from_outputs",
    "dense_attention",
    "mask_statistics",
    "merge_partial_attention",
    "refresh_attention",
    "rotary_interleaved",
]
