"""The interface sparse-attention methods implement, and the per-(context, layer) plan cache.

A replaced processor projects q, k, v exactly as the stock processor does and hands them, after RoPE, to
its method as ``method.attention(q, k, v, call)``; ``call`` (an :class:`AttentionCall`) describes the layer
and the forward (step, CFG context, geometry) and carries the ways to compute attention on these q, k, v:

- ``call.run_dense()``: the stock diffusers attention op, exactly (dense warm-up steps, dense layers);
- ``call.run_dense(return_lse=True)``: dense attention through dit_accel's kernels, with the log-sum-exp
  (fused pattern searches, full passes of corrected methods);
- ``call.run_sparse(plan, return_lse=False)``: block-sparse attention with a :class:`BlockPlan`.

Per call a method decides: dense, sparse with a plan, or anything computed from these (a corrected output).
The default :meth:`SparseMethod.attention` runs dense on warm-up steps and dense layers, and otherwise asks
:meth:`SparseMethod.plan_for` for a plan, cached in ``call.entry`` (one :class:`CacheEntry` per
(context, layer)) and rebuilt when :meth:`SparseMethod.plan_key` changes (geometry, block sizes, batch) or
when :meth:`SparseMethod.reuse_plan` says so (adaptive methods re-search on their schedule). Methods keep any
other per-(context, layer) tensors (a cached LSE, correction terms) in ``call.entry.state``; every entry is
dropped when a new run starts.

Three shapes of method fit this:

- static (radial): ``plan_for`` from geometry only, ``reuse_plan`` always True;
- adaptive (adaspa): override ``attention`` to run ``call.run_dense(return_lse=True)`` at search steps, keep
  the LSE in ``call.entry.state``, set the searched plan with ``call.entry.set_plan(plan, step)``;
- corrected (rettention): override ``attention`` to run dense and sparse with LSE at refresh steps, cache the
  ratio and residual in ``call.entry.state``, and return ``rho * out_sparse + R`` at sparse steps.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import SparseAttentionConfig
from ..kernels import BlockPlan, block_sparse_attention, dense_attention
from ..tracking import ForwardInfo

__all__ = ["AttentionCall", "CacheEntry", "PlanCache", "SparseMethod"]

logger = logging.getLogger("dit_accel")


@functools.cache
def _warn_once(msg: str) -> None:
    logger.warning(msg)


@dataclass
class CacheEntry:
    """What a method keeps for one (context, layer) during a run.

    Attributes:
        key: the :meth:`SparseMethod.plan_key` the entry was built for.
        plan: the current plan (None: none built yet).
        density: the plan's density, computed once when it is set.
        step: the step the plan was built at.
        state: free-form per-(context, layer) tensors of the method (cached LSE, correction terms).
    """

    key: Hashable = None
    plan: BlockPlan | None = None
    density: float | None = None
    step: int | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def set_plan(self, plan: BlockPlan, step: int | None) -> None:
        self.plan, self.density, self.step = plan, plan.density(), step


class PlanCache:
    """:class:`CacheEntry` per (context, layer); an entry whose key changed starts over."""

    def __init__(self):
        self._entries: dict[tuple[str, str], CacheEntry] = {}
        self.builds = 0

    def entry(self, context: str, layer: str, key: Hashable) -> CacheEntry:
        e = self._entries.get((context, layer))
        if e is None or e.key != key:
            e = CacheEntry(key=key)
            self._entries[(context, layer)] = e
        return e

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> dict[tuple[str, str], CacheEntry]:
        return dict(self._entries)


class AttentionCall:
    """One attention call of a replaced layer: its description and the ways to compute it.

    Attributes:
        layer: unique layer name ("transformer.blocks.3.attn1").
        layer_index, num_layers: index of the layer among its transformer's replaced layers; their count.
        info: the forward's :class:`ForwardInfo` (context, step, num_steps, cfg, grid, ...).
        batch, heads, q_len, k_len, head_dim: attention shape.
        layout: "bshd" (q is [B, S, H, D]) or "bhsd" ([B, H, S, D]).
        kv_len: int32 [B] valid keys per batch element (padded text), or None.
        text_len, text_position: text tokens in this attention's sequence and where ("first", "last", None).
        grid: latent grid (T, H, W) in tokens, or None.
        config: the run's :class:`SparseAttentionConfig`.
        entry: this (context, layer)'s :class:`CacheEntry`.
    """

    def __init__(
        self,
        *,
        layer: str,
        layer_index: int,
        num_layers: int,
        info: ForwardInfo,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: str,
        dense_fn: Callable[[], torch.Tensor],
        kv_len: torch.Tensor | None,
        text_len: int,
        text_position: str | None,
        config: SparseAttentionConfig,
    ):
        self.layer, self.layer_index, self.num_layers = layer, layer_index, num_layers
        self.info = info
        self.layout = layout
        self.kv_len = kv_len
        self.text_len, self.text_position = text_len, text_position
        self.grid = info.grid
        self.config = config
        self.entry: CacheEntry | None = None
        self.events: list[tuple[str, float]] = []
        self.label: str | None = None
        self._q, self._k, self._v, self._dense_fn = q, k, v, dense_fn
        if layout == "bshd":
            self.batch, self.q_len, self.heads, self.head_dim = q.shape
            self.k_len = k.shape[1]
        else:
            self.batch, self.heads, self.q_len, self.head_dim = q.shape
            self.k_len = k.shape[2]

    @property
    def step(self) -> int:
        return self.info.step

    @property
    def context(self) -> str:
        return self.info.context

    def run_dense(self, return_lse: bool = False):
        """Dense attention on this call's q, k, v, by ``config.dense_backend``.

        Returns the output (in ``layout``) when ``return_lse`` is False: the stock diffusers op's for
        ``dense_backend="stock"``, else ``dit_accel.kernels.dense_attention``'s with that backend. With
        ``return_lse`` it returns ``(out, lse)`` (lse fp32 [B, H, S_q]) from ``dense_attention`` with
        ``dense_backend`` ("stock": ``config.backend``).
        """
        self.events.append(("dense", 1.0))
        dense_backend = self.config.dense_backend
        if not return_lse and dense_backend == "stock":
            return self._dense_fn()
        return dense_attention(
            self._q,
            self._k,
            self._v,
            kv_len=self.kv_len,
            layout=self.layout,
            backend=self.config.backend if dense_backend == "stock" else dense_backend,
            return_lse=return_lse,
        )

    def run_sparse(self, plan: BlockPlan, return_lse: bool = False):
        """Block-sparse attention on this call's q, k, v: out in ``layout`` (and lse fp32 [B, H, S_q])."""
        if self.entry is not None and plan is self.entry.plan and self.entry.density is not None:
            density = self.entry.density
        else:
            density = plan.density()
        self.events.append(("sparse", density))
        out, lse = block_sparse_attention(
            self._q,
            self._k,
            self._v,
            plan,
            kv_len=self.kv_len,
            layout=self.layout,
            backend=self.config.backend,
        )
        return (out, lse) if return_lse else out


class SparseMethod:
    """Base class of attention methods. Subclasses implement :meth:`plan_for` or override :meth:`attention`.

    A method instance belongs to one :func:`dit_accel.apply` handle; its :attr:`cache` holds the plans.
    """

    name = "base"

    def __init__(self):
        self.cache = PlanCache()
        self._last_memory: dict[str, int] = {}

    def new_run(self) -> None:
        """Drop run-scoped state (called when the step tracker starts a new run)."""
        if len(self.cache):
            self._last_memory = self._memory_now()
        self.cache.clear()

    def memory(self) -> dict[str, int]:
        """Bytes held by the per-(context, layer) caches: ``plans``, ``state`` (tensors directly in
        ``entry.state``) and ``total``; methods may add keys. Between runs: the figures at the end of the
        latest run that cached anything ({} before any)."""
        return self._memory_now() if len(self.cache) else dict(self._last_memory)

    def _memory_now(self) -> dict[str, int]:
        # Counted once per object: a static method shares one plan among all its entries.
        plans: dict[int, int] = {}
        state: dict[int, int] = {}
        for e in self.cache.entries().values():
            if e.plan is not None:
                plans[id(e.plan)] = e.plan.nbytes()
            state.update({id(t): t.nbytes for t in e.state.values() if isinstance(t, torch.Tensor)})
        total_plans, total_state = sum(plans.values()), sum(state.values())
        return {"plans": total_plans, "state": total_state, "total": total_plans + total_state}

    def configure(self, config: SparseAttentionConfig, families: tuple[str, ...]) -> SparseAttentionConfig:
        """The configuration to run with, given the model families of the handle's transformers.

        :func:`dit_accel.apply` calls this once, before any forward, with the distinct family names
        (``"wan"``, ``"flux"``, ...: ``dit_accel.processors`` ``Family.name``). A method may refuse families
        it cannot serve (raise ValueError) and fill fields the user left None (``dense_steps``,
        ``dense_layers``) with its per-family defaults. The default returns ``config`` unchanged.
        """
        return config

    def dense_reason(self, call: AttentionCall) -> str | None:
        """Why this call runs dense ("dense layer", "warm-up"), or None."""
        if call.config.is_dense_layer(call.layer_index, call.num_layers):
            return "dense layer"
        n = call.config.num_dense_steps(call.info.num_steps)
        if n is None:
            _warn_once(
                f"dense_steps={call.config.dense_steps} is a fraction but the number of steps is unknown "
                f"(context {call.info.context!r}); running dense until it is known"
            )
            return "warm-up"
        return "warm-up" if call.info.step < n else None

    def plan_key(self, call: AttentionCall) -> Hashable:
        """What a cached plan depends on; a change rebuilds it."""
        return (
            call.batch,
            call.heads,
            call.q_len,
            call.k_len,
            call.grid,
            call.text_len,
            call.text_position,
            call.config.block_q,
            call.config.block_k,
        )

    def reuse_plan(self, entry: CacheEntry, call: AttentionCall) -> bool:
        """Whether ``entry.plan`` serves this call (static methods: always)."""
        return True

    def plan_for(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> BlockPlan | None:
        """The block plan for this call (None: run dense). q, k are after RoPE, in ``call.layout``."""
        raise NotImplementedError(f"{type(self).__name__} must implement plan_for or attention")

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall
    ) -> torch.Tensor:
        """The attention output for this call, in ``call.layout`` and q's dtype."""
        if self.dense_reason(call) is not None:
            return call.run_dense()
        entry = call.entry
        if entry.plan is None or not self.reuse_plan(entry, call):
            plan = self.plan_for(q, k, call)
            if plan is None:
                return call.run_dense()
            entry.set_plan(plan, call.step)
        return call.run_sparse(entry.plan)
