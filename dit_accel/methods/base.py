"""The interface sparse-attention methods implement, and the per-(context, layer) plan cache.

A replaced processor projects q, k, v exactly as the stock processor does and hands them, after RoPE, to
its method as ``method.attention(q, k, v, call)``; ``call`` (an :class:`AttentionCall`) describes the layer
and the forward (step, CFG context, geometry) and carries the ways to compute attention on these q, k, v:

- ``call.run_dense()``: dense attention by ``config.dense_backend`` (default "stock": the stock diffusers
  attention op, exactly) for dense warm-up steps and dense layers;
- ``call.run_dense(return_lse=True)``: dense attention through dit_accel's kernels, with the log-sum-exp
  (fused pattern searches, full passes of corrected methods);
- ``call.run_sparse(plan, return_lse=False, correction=None)``: block-sparse attention with a
  :class:`BlockPlan` (corrected with cached softmax statistics when given);
- ``call.run_refresh(plan, residual_dtype)``: dense attention plus the statistics of ``plan``'s mask.

Per call a method decides: dense, sparse with a plan, or anything computed from these (a corrected output).
The default :meth:`SparseMethod.attention` runs dense on warm-up steps and dense layers, and otherwise asks
:meth:`SparseMethod.plan_for` for a plan, cached in ``call.entry`` (one :class:`CacheEntry` per
(context, layer)) and rebuilt when :meth:`SparseMethod.plan_key` changes (geometry, block sizes, batch) or
when :meth:`SparseMethod.reuse_plan` says so. Methods keep any other per-(context, layer) tensors (a cached
LSE, correction terms) in ``call.entry.state``, through the method's :class:`StateLedger` (``method.cache``)
when they should count against its byte budget, and host bookkeeping about them (steps, plan ids) in
``call.entry.marks``; every entry is dropped when a new run starts.

The built-in methods are compositions of a pattern, the shared schedule and an optional correction
(:mod:`dit_accel.methods.composed`); a user method may subclass :class:`SparseMethod` directly:

- static: ``plan_for`` from geometry only, ``reuse_plan`` always True;
- adaptive: override ``attention`` to run ``call.run_dense(return_lse=True)`` at search steps, keep the LSE
  in ``call.entry.state``, set the searched plan with ``call.entry.set_plan(plan, step)``;
- corrected: override ``attention`` to run ``call.run_refresh(plan)`` at refresh steps and
  ``call.run_sparse(plan, correction=...)`` in between.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable

import torch

from ..config import SparseAttentionConfig
from ..kernels import (
    BlockPlan,
    SoftmaxCorrection,
    block_sparse_attention,
    dense_attention,
    mask_statistics,
    refresh_attention,
)
from ..tracking import ForwardInfo
from .ledger import CacheEntry, StateLedger

__all__ = ["AttentionCall", "CacheEntry", "PlanCache", "SparseMethod", "StateLedger"]

# The per-(context, layer) store was a plan cache before it kept state under a budget; the old name stays.
PlanCache = StateLedger

logger = logging.getLogger("dit_accel")


@functools.cache
def _warn_once(msg: str) -> None:
    logger.warning(msg)


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
        self.block_q, self.block_k = config.blocks_for(q.shape[1 if layout == "bshd" else 2])
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
    def dtype(self) -> torch.dtype:
        return self._q.dtype

    @property
    def device(self) -> torch.device:
        return self._q.device

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

    def _density(self, plan: BlockPlan) -> float:
        if self.entry is not None and plan is self.entry.plan and self.entry.density is not None:
            return self.entry.density
        return plan.density()

    def run_sparse(
        self,
        plan: BlockPlan,
        return_lse: bool = False,
        correction: SoftmaxCorrection | None = None,
        rho_offset: float | torch.Tensor = 0.0,
        clamp_rho: bool = True,
    ):
        """Block-sparse attention on this call's q, k, v: out in ``layout`` (and lse fp32 [B, H, S_q]);
        with ``correction``, ``min(rho + rho_offset, 1) * out + R`` (see ``block_sparse_attention``)."""
        self.events.append(("sparse", self._density(plan)))
        out, lse = block_sparse_attention(
            self._q,
            self._k,
            self._v,
            plan,
            kv_len=self.kv_len,
            layout=self.layout,
            backend=self.config.backend,
            correction=correction,
            rho_offset=rho_offset,
            clamp_rho=clamp_rho,
        )
        return (out, lse) if return_lse else out

    def run_statistics(
        self, plan: BlockPlan, out: torch.Tensor, lse: torch.Tensor, residual_dtype: torch.dtype | None = None
    ) -> SoftmaxCorrection:
        """The softmax statistics of ``plan``'s mask given this call's dense output and LSE (from
        ``run_dense(return_lse=True)``): one pass over the plan's blocks (see
        ``dit_accel.kernels.mask_statistics``)."""
        self.events.append(("sparse", self._density(plan)))
        return mask_statistics(
            self._q,
            self._k,
            self._v,
            plan,
            out,
            lse,
            kv_len=self.kv_len,
            layout=self.layout,
            backend=self.config.backend,
            residual_dtype=residual_dtype,
        )

    def run_refresh(self, plan: BlockPlan, residual_dtype: torch.dtype | None = None):
        """Dense attention plus the softmax statistics of ``plan``'s mask, in one pass over the keys:
        ``(out, lse, SoftmaxCorrection)`` (see ``dit_accel.kernels.refresh_attention``)."""
        self.events.append(("refresh", 1.0))
        return refresh_attention(
            self._q,
            self._k,
            self._v,
            plan,
            kv_len=self.kv_len,
            layout=self.layout,
            backend=self.config.backend,
            residual_dtype=residual_dtype,
        )


class SparseMethod:
    """Base class of attention methods. Subclasses implement :meth:`plan_for` or override :meth:`attention`.

    A method instance belongs to one :func:`dit_accel.apply` handle; its :attr:`cache` holds the plans.
    """

    name = "base"

    def __init__(self):
        self.cache = StateLedger()

    def new_run(self) -> None:
        """Drop run-scoped state (called when the step tracker starts a new run)."""
        self.cache.clear()

    def memory(self) -> dict:
        """What the method keeps (:meth:`StateLedger.report`): bytes per state name (``lse``,
        ``correction``, ...), ``plans``, ``state``, ``total``, ``peak``, ``host``, ``budget`` and the
        counts of downgraded / offloaded / dropped values. Between runs: the figures at the end of the latest
        run that kept anything ({} before any)."""
        return self.cache.report()

    def configure(self, config: SparseAttentionConfig, families: tuple) -> SparseAttentionConfig:
        """The configuration to run with, given the model families of the handle's transformers.

        :func:`dit_accel.apply` calls this once, before any forward, with the distinct
        :class:`dit_accel.processors.Family` objects of the handle's transformers. A method may refuse
        families it cannot serve (raise ValueError) and fill fields the user left None (``dense_steps``,
        ``dense_layers``) from ``family.defaults``. The default sets the ledger's budget from the config and
        returns ``config`` unchanged.
        """
        self.cache.max_bytes = config.max_state_bytes
        self.cache.offload = config.state_offload
        return config

    def blocks_for(self, call: AttentionCall) -> tuple[int, int]:
        """(block_q, block_k) of ``call``'s plans. The processor sets them on the call before anything else
        reads them. The default is the config's (``SparseAttentionConfig.blocks_for``); a method whose
        pattern needs finer blocks than the automatic ones may make them smaller when the user set none."""
        return call.config.blocks_for(call.q_len)

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

    def graph_key(self, info: ForwardInfo, config: SparseAttentionConfig) -> Hashable | None:
        """What every call of a transformer forward at ``info`` decides from, besides the attention shapes and
        the identity of the plans and state in :attr:`cache` (``cuda_graphs=True``, :mod:`dit_accel.graphs`).

        Two forwards with the same key and the same ledger contents must make the same kernel calls with the
        same arguments: a forward is captured as a CUDA graph once and replayed for later forwards with its
        key, without running this method's Python. Include ``info.context`` when the forward reads state kept
        per CFG context (its plans): forwards of different contexts share a key, and a graph, otherwise.
        None runs the forward eagerly: at steps that read results back to the host (searches) or renew state
        (refreshes), or whose arguments change every step. The default is None, so a method runs under
        graphs only when it says what its decisions depend on.
        """
        return None

    def prepare_replay(self, info: ForwardInfo) -> None:
        """Called before a forward at ``info`` is captured as a CUDA graph and before each replay of one:
        write the per-step values that this method's kernels read from device tensors (a replay runs none of
        the method's Python, so a value passed as a launch argument would stay the captured one). The default
        writes nothing."""

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
            call.block_q,
            call.block_k,
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
