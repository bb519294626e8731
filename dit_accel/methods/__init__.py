"""Attention methods: the interface (:class:`SparseMethod`), the composed methods and their parts.

A built-in method is a pattern (window, radial, searched from attention mass), the shared step schedule and
an optional correction (re-ttention), composed by :class:`ComposedMethod`; per-layer state lives in one
:class:`StateLedger` with a byte budget. The names "dense", "window", "radial", "adaspa" and "rettention"
are presets of these parts (:func:`create_method`).
"""

from __future__ import annotations

import inspect

from ..config import SparseAttentionConfig
from .adaspa import AdaspaMethod, SearchedPattern
from .base import AttentionCall, CacheEntry, PlanCache, SparseMethod
from .composed import ComposedMethod, Pattern
from .dense import DenseMethod
from .ledger import StateLedger
from .radial import RadialMethod, RadialPattern
from .rettention import Correction, RettentionMethod
from .schedule import Schedule
from .window import WindowMethod, WindowPattern

__all__ = [
    "AdaspaMethod",
    "AttentionCall",
    "CacheEntry",
    "ComposedMethod",
    "Correction",
    "DenseMethod",
    "Pattern",
    "PlanCache",
    "RadialMethod",
    "RadialPattern",
    "RettentionMethod",
    "Schedule",
    "SearchedPattern",
    "SparseMethod",
    "StateLedger",
    "WindowMethod",
    "WindowPattern",
    "create_method",
    "method_knobs",
    "method_names",
]

_BUILTIN = {
    "dense": DenseMethod,
    "window": WindowMethod,
    "radial": RadialMethod,
    "adaspa": AdaspaMethod,
    "rettention": RettentionMethod,
}


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
    if not isinstance(method, str) or method not in _BUILTIN:
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
