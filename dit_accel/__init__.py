"""dit_accel: training-free sparse attention for diffusers' diffusion transformers.

One line switches it on: ``handle = dit_accel.apply(pipe, method="window")``; ``dit_accel.remove(pipe)``
restores the stock processors. ``dit_accel.attn_processors(transformer)`` returns processors for
``transformer.set_attn_processor``.
"""

from .api import AttentionStats, SparseAttentionHandle, apply, attn_processors, remove
from .config import SparseAttentionConfig
from .methods import SparseMethod

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "SparseAttentionConfig",
    "SparseAttentionHandle",
    "SparseMethod",
    "__version__",
    "apply",
    "attn_processors",
    "remove",
]
