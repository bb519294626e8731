"""Attention methods: the interface (:class:`SparseMethod`) and the built-in dense and window methods."""

from __future__ import annotations

import inspect

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
    "method_knobs",
    "method_names",
]

_BUILTIN = {"dense": DenseMethod, "window": WindowMethod, "radial": RadialMethod, "adaspa": AdaspaMethod}
_PLANNED = ("rettention",)


def method_names() -> tuple[str, ...]:
    """The method names :func:`create_method` accepts (besides a :class:`SparseMethod` instance)."""
    return tuple(_BUILTIN)


def method_knobs(name: str) -> tuple[str, ...]:
    """The options method ``name`` takes (its keyword arguments), besides the config's own fields.

    Raises:
        ValueError: an unknown method name (the message lists the known ones).
    """
    if name not in _BUILTIN:
        raise ValueError(f"unknown method {name!r}; available: {sorted(_BUILTIN)}")
    params = inspect.signature(_BUILTIN[name].__init__).parameters
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p for p in params if p != "self" and params[p].kind in keyword)


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
    unknown = sorted(set(config.options) - set(method_knobs(method)))
    if unknown:
        raise ValueError(
            f"bad options {unknown} for method {method!r}; its options are {list(method_knobs(method))} "
            f"(and the SparseAttentionConfig fields)"
        )
    return _BUILTIN[method](**config.options)
