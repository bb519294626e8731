"""Per-family processors that replace diffusers' self-attention with dit_accel's methods.

:func:`family_for` maps a transformer to its :class:`Family`; family modules are imported on first use.
"""

from __future__ import annotations

import importlib

import torch

from .base import Family, Runtime, SparseAttnProcessorBase

__all__ = ["Family", "Runtime", "SparseAttnProcessorBase", "SUPPORTED", "family_for"]

# diffusers transformer class -> family module
SUPPORTED = {
    "WanTransformer3DModel": "wan",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "CogVideoXTransformer3DModel": "cogvideox",
    "LTXVideoTransformer3DModel": "ltx",
    "MochiTransformer3DModel": "mochi",
    "FluxTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
    "PixArtTransformer2DModel": "pixart",
    "QwenImageTransformer2DModel": "qwenimage",
}

_LINEAR_ATTENTION = {"SanaTransformer2DModel", "SanaVideoTransformer3DModel"}


def _supported_list() -> str:
    return ", ".join(sorted(SUPPORTED))


def family_for(transformer: torch.nn.Module) -> Family:
    """The :class:`Family` of ``transformer``; a ValueError naming the supported classes otherwise."""
    name = type(transformer).__name__
    if name in _LINEAR_ATTENTION:
        raise ValueError(
            f"{name} uses linear attention, which has no softmax attention for dit_accel to sparsify. "
            f"Supported transformers: {_supported_list()}"
        )
    for cls in type(transformer).__mro__:
        module = SUPPORTED.get(cls.__name__)
        if module is not None:
            return importlib.import_module(f"{__name__}.{module}").FAMILY
    raise ValueError(f"{name} is not supported by dit_accel. Supported transformers: {_supported_list()}")
