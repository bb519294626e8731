"""torch.compile support: the per-call Python of dit_accel runs inside two opaque custom ops.

A method decides per call (step, layer, CFG context) what to compute, builds or searches plans and keeps
state: Python that must not be traced (its branches would be specialised into guards and recompile at
every step and layer). Under ``torch.compile`` the processors and the step-tracking hook therefore hand
that work to custom ops, which the compiler treats as single opaque nodes:

- ``dit_accel::track(slot, order, hidden_states, timestep, grid, text_len, text_position)`` runs the
  step tracker's bookkeeping for one transformer forward (the hook's pre-forward) and bumps ``order``;
- ``dit_accel::attend(q, k, v, kv_len, slot, order, layout, text_len, text_position, key_mask) -> out``
  runs one attention call through the handle's method (a padded-text family's boolean key mask is read
  there, on the host, not in the graph). It reads ``order``, so the compiler keeps it after the
  ``track`` of its forward.

Everything that differs between layers and steps is data, not a constant baked into the graph: the layer
is a 0-d int64 CPU tensor (``slot``) looked up in a registry at run time, the step lives in the tracker.
Blocks of different layers therefore share one compiled graph, and steps never recompile. Dense calls in
a compiled region run ``torch.nn.functional.scaled_dot_product_attention`` (what diffusers' default
"native" backend runs), masked by ``kv_len`` where a family pads its text.
"""

from __future__ import annotations

import itertools
import weakref

import torch

__all__ = ["attend", "default_dense", "register", "track"]

_REGISTRY: dict[int, weakref.ref] = {}
_NEXT = itertools.count(1)


def register(obj) -> torch.Tensor:
    """A slot for ``obj`` (a processor or a step-tracker hook): a 0-d int64 CPU tensor naming it."""
    slot = next(_NEXT)
    _REGISTRY[slot] = weakref.ref(obj)
    return torch.tensor(slot, dtype=torch.int64)


def _lookup(slot: torch.Tensor):
    obj = _REGISTRY.get(int(slot))
    obj = obj() if obj is not None else None
    if obj is None:
        raise RuntimeError(f"dit_accel: no live processor or hook for slot {int(slot)} (it was removed)")
    return obj


def default_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len,
    layout: str,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention as diffusers' native backend runs it, in ``layout``; keys past ``kv_len`` masked (or
    those ``key_mask``, bool [B, S_k], leaves out)."""
    qh, kh, vh = (x.transpose(1, 2) if layout == "bshd" else x for x in (q, k, v))
    mask = None
    if key_mask is not None:
        mask = key_mask.to(device=kh.device, dtype=torch.bool)[:, None, None, :]
    elif kv_len is not None:
        cols = torch.arange(kh.shape[2], device=kh.device)
        mask = (cols[None, :] < kv_len.to(kh.device)[:, None])[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(1, 2) if layout == "bshd" else out


@torch.library.custom_op("dit_accel::attend", mutates_args=())
def _attend_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_len: torch.Tensor | None,
    slot: torch.Tensor,
    order: torch.Tensor,
    layout: str,
    text_len: int,
    text_position: str,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    processor = _lookup(slot)
    if key_mask is not None:
        from .processors.base import _log_once, prefix_lengths

        kv_len = prefix_lengths(key_mask)
    if key_mask is not None and kv_len is None:
        _log_once(
            f"{type(processor).__name__}: a key mask that is not a prefix of each row was passed; "
            "running stock attention for those calls"
        )
        out = default_dense(q, k, v, None, layout, key_mask=key_mask)
    else:
        out = processor.runtime.attend(
            processor,
            q,
            k,
            v,
            layout=layout,
            dense_fn=lambda: default_dense(q, k, v, kv_len, layout),
            kv_len=kv_len,
            text_len=None if text_len < 0 else text_len,
            text_position=text_position or None,
        )
    out = out.contiguous()
    if out.data_ptr() in (q.data_ptr(), k.data_ptr(), v.data_ptr()):
        out = out.clone()  # a custom op's output must not alias its inputs
    return out


@_attend_op.register_fake
def _(q, k, v, kv_len, slot, order, layout, text_len, text_position, key_mask=None):
    return q.new_empty(q.shape)


@torch.library.custom_op("dit_accel::track", mutates_args=("order",))
def _track_op(
    slot: torch.Tensor,
    order: torch.Tensor,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor | None,
    grid: list[int],
    text_len: int,
    text_position: str,
) -> None:
    hook = _lookup(slot)
    hook.begin(hidden_states, timestep, tuple(grid) if grid else None, text_len, text_position or None)
    order.add_(1)


@_track_op.register_fake
def _(slot, order, hidden_states, timestep, grid, text_len, text_position):
    return None


def attend(processor, q, k, v, *, layout, kv_len, text_len, text_position, key_mask=None) -> torch.Tensor:
    """The attention call of ``processor`` as one opaque node of a compiled graph. ``key_mask`` (instead of
    ``kv_len``): a boolean key mask read inside the node, as ``SparseAttnProcessorBase._attend`` reads it."""
    return torch.ops.dit_accel.attend(
        q,
        k,
        v,
        kv_len,
        processor.slot,
        processor.runtime.tracker.order,
        layout,
        -1 if text_len is None else int(text_len),
        text_position or "",
        key_mask,
    )


def track(hook, hidden_states, timestep, grid, text_len: int, text_position) -> None:
    """The step tracker's bookkeeping for one forward as one opaque node of a compiled graph."""
    if timestep is not None and not isinstance(timestep, torch.Tensor):
        timestep = torch.tensor(float(timestep))
    torch.ops.dit_accel.track(
        hook.slot,
        hook.tracker.order,
        hidden_states,
        timestep,
        list(grid) if grid is not None else [],
        int(text_len),
        text_position or "",
    )
