"""Attention methods: the interface (:class:`SparseMethod`) and the built-in dense and window methods."""

from __future__ import annotations

from ..config import SparseAttentionConfig
from .adaspa import AdaspaMethod
from .base import AttentionCall, CacheEntry, PlanCache, SparseMethod
from .dense import DenseMethod
from .radial import RadialMethod
from .window import WindowMethod

__all__ = [
    "AttentionCall",
    "CacheEntry",
    "DenseMethod",
    "PlanCache",
    "SparseMethod",
    "WindowMethod",
    "create_method",
]

_BUILTIN = {"dense": DenseMethod, "window": WindowMethod, "radial": RadialMethod, "adaspa": AdaspaMethod}
_PLANNED = ("rettention",)


def create_method(config: SparseAttentionConfig) -> SparseMethod:
    """A fresh method instance for ``config`` (its ``method`` name and ``options``)."""
    method = config.method
    if isinstance(method, SparseMethod):
        if config.options:
            raise ValueError(
                f"options {sorted(config.options)} apply to methods named by string; configure the "
                f"{type(method).__name__} instance directly"
            )
        return method
    if method in _PLANNED:
        raise NotImplementedError(
            f"method {method!r} is not wired into the processors yet; available: {sorted(_BUILTIN)}"
        )
    if method not in _BUILTIN:
        raise ValueError(
            f"unknown method {method!r}; available: {sorted(_BUILTIN)} or a SparseMethod instance"
        )
    cls = _BUILTIN[method]
    try:
        return cls(**config.options)
    except TypeError as exc:
        raise ValueError(f"bad options {dict(config.options)} for method {method!r}: {exc}") from None
