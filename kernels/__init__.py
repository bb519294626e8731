"""dit_accel.kernels: block-sparse attention kernels (Triton) and their pure-torch references.

Public: :class:`BlockPlan`, :func:`block_sparse_attention`, :func:`dense_attention`, :func:`block_mass`.
This package imports only torch and triton; ``xformers_attention`` imports xformers lazily, for its backend.
"""

from .ops import block_mass, block_sparse_attention, dense_attention
from .plan import BlockPlan

__all__ = ["BlockPlan", "block_mass", "block_sparse_attention", "dense_attention"]
