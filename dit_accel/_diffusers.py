"""Every diffusers name dit_accel uses beyond diffusers' public API, in one place.

Mirrors diffusers 0.42 (pyproject pins ``diffusers>=0.42,<0.43``). tests/test_reliability.py checks that each
name below exists and behaves as assumed here, so a diffusers upgrade that moves one fails there first,
with a message naming it.

- Hook state: ``BaseState`` and ``StateManager`` live in ``diffusers.hooks.hooks`` and are not exported by
  ``diffusers.hooks``. diffusers' ``cache_context`` hands the current ``CacheContext`` to every
  ``StateManager`` attribute of a stateful hook (``ModelHook._is_stateful``) through ``set_context``; the
  step tracker reads it back from ``StateManager._context`` (the public ``context`` property raises when
  none is set).
- The hook registry of a module is the attribute ``_diffusers_hook`` that
  ``HookRegistry.check_if_exists_or_initialize`` creates.
- Processors carry ``_attention_backend`` and ``_parallel_config``, set by ``set_attention_backend`` and by
  context parallelism.
- Per-family projection helpers (``_get_qkv_projections`` of Wan and Flux) and the attention dispatcher
  and RoPE helpers the stock processors call.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections as flux_qkv_projections
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_apply_rotary_emb
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from diffusers.models.transformers.transformer_wan import _get_qkv_projections as wan_qkv_projections

__all__ = [
    "DIFFUSERS_SERIES",
    "PROCESSOR_ATTRS",
    "REGISTRY_ATTR",
    "BaseState",
    "HookRegistry",
    "ModelHook",
    "StateManager",
    "apply_rotary_emb",
    "apply_rotary_emb_qwen",
    "dispatch_attention_fn",
    "drop_registry",
    "flux_qkv_projections",
    "hook_registry",
    "ltx_apply_rotary_emb",
    "state_context",
    "wan_qkv_projections",
]

DIFFUSERS_SERIES = "0.42"

REGISTRY_ATTR = "_diffusers_hook"

PROCESSOR_ATTRS = ("_attention_backend", "_parallel_config")


def hook_registry(module: torch.nn.Module) -> HookRegistry | None:
    """The module's own diffusers hook registry, or None (never created here)."""
    return module.__dict__.get(REGISTRY_ATTR)


def drop_registry(module: torch.nn.Module) -> None:
    """Delete the module's hook registry (only call this when it holds no hook)."""
    module.__dict__.pop(REGISTRY_ATTR, None)


def state_context(manager: StateManager):
    """The ``CacheContext`` diffusers last handed to ``manager`` (None outside ``cache_context``)."""
    return manager._context
