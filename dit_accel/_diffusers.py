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
- Context parallelism (``ModelMixin.enable_parallelism``): the Ulysses all-to-all of
  ``models.attention_dispatch`` (``SeqAllToAllDim``, the autograd wrapper of ``_all_to_all_dim_exchange``:
  (B, S/P, H, D) <-> (B, S, H/P, D) over a process group, rank-major along the sequence); the process groups
  ``ContextParallelConfig`` keeps in ``_ulysses_mesh`` and ``_flattened_mesh`` after ``setup``; the split
  hooks that ``hooks.context_parallel.apply_context_parallel`` registers from a model's ``_cp_plan``
  (``ContextParallelSplitHook`` with ``metadata`` and ``parallel_config``; it shards with
  ``EquipartitionSharder`` or, in the "anything" modes, ``PartitionAnythingSharder``, whose ``unshard`` /
  ``unshard_anything`` gather back; ``_wait_tensor`` completes the asynchronous result of ``unshard``); and
  the registration order of a module's hooks, ``HookRegistry._hook_order`` (the hook registered last runs
  its ``pre_forward`` first).
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.context_parallel import (
    ContextParallelSplitHook,
    EquipartitionSharder,
    PartitionAnythingSharder,
)
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models._modeling_parallel import ContextParallelInput
from diffusers.models.attention_dispatch import SeqAllToAllDim, _wait_tensor, dispatch_attention_fn
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
    "context_parallel_group",
    "dispatch_attention_fn",
    "drop_registry",
    "flux_qkv_projections",
    "hook_registry",
    "ltx_apply_rotary_emb",
    "outer_split_hooks",
    "seq_all_to_all",
    "state_context",
    "ulysses_group",
    "unshard_input",
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


def seq_all_to_all(x: torch.Tensor, group, gather_sequence: bool) -> torch.Tensor:
    """diffusers' Ulysses exchange: [B, S/P, H, D] -> [B, S, H/P, D] (``gather_sequence``; the sequence comes
    back rank-major: rank 0's tokens, then rank 1's, ...) or its inverse. Differentiable."""
    scatter, gather = (2, 1) if gather_sequence else (1, 2)
    return SeqAllToAllDim.apply(group, x.contiguous(), scatter, gather)


def ulysses_group(cp_config):
    """The process group of a set-up ``ContextParallelConfig``'s Ulysses mesh dimension."""
    return cp_config._ulysses_mesh.get_group()


def context_parallel_group(cp_config):
    """The process group of all ranks of a set-up ``ContextParallelConfig`` (ring x Ulysses)."""
    return cp_config._flattened_mesh.get_group()


def hooks_after(module: torch.nn.Module, name: str) -> list[str]:
    """Names of the hooks on ``module`` registered after the hook ``name`` (they wrap it). diffusers'
    ``remove_hook`` on a hook that another one with a ``new_forward`` wraps points that one's ``forward``
    past its own ``new_forward``, so such a hook is better left in place, passing through."""
    registry = hook_registry(module)
    if registry is None or name not in registry._hook_order:
        return []
    order = registry._hook_order
    return list(order[order.index(name) + 1 :])


def outer_split_hooks(module: torch.nn.Module, name: str) -> list:
    """The context-parallel split hooks on ``module`` registered after the hook ``name``: they run their
    ``pre_forward`` before it, so that hook sees the inputs they shard."""
    registry = hook_registry(module)
    if registry is None or name not in registry._hook_order:
        return []
    order = registry._hook_order
    later = order[order.index(name) + 1 :]
    return [h for h in (registry.get_hook(n) for n in later) if isinstance(h, ContextParallelSplitHook)]


def unshard_input(hook, name: str, value):
    """The whole tensor that ``hook`` (a ``ContextParallelSplitHook``) sharded as its input ``name``, gathered
    from every rank (a collective), or ``value`` itself when the hook leaves that input as it is."""
    spec = hook.metadata.get(name)
    if not isinstance(spec, ContextParallelInput) or spec.split_output or not isinstance(value, torch.Tensor):
        return value
    if spec.expected_dims is not None and value.dim() != spec.expected_dims:
        return value
    cp = hook.parallel_config
    if cp.ulysses_anything or cp.ring_anything:
        return PartitionAnythingSharder.unshard_anything(value, spec.split_dim, cp._flattened_mesh)
    return _wait_tensor(EquipartitionSharder.unshard(value, spec.split_dim, cp._flattened_mesh))
