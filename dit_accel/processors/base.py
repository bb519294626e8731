"""What every family's processor shares: the runtime they report to, the processor base, the family spec.

A family module (``wan.py``, ``flux.py``, ...) defines processors that mirror the stock diffusers processor
line for line around the attention op and replace that op with ``self._attend(q, k, v, ...)``, passing the
stock op as a closure for dense calls. It also states which attention modules it replaces and how to read the
latent grid and text length from the transformer's forward arguments (:class:`Family`).

Two things diffusers does to processors outside a transformer forward are handled here:

- Gradient checkpointing recomputes each block in backward. A forward the step tracker records (grad enabled,
  checkpointing on) leaves, per processor, the :class:`ForwardInfo` it saw, a copy of its cache entry as it
  was before the call and the plans it ran; the recomputation pops the latest record, runs the method again
  from that state with those plans, and adds nothing to the stats. Methods must therefore replace the
  tensors in ``entry.state`` rather than edit them in place.
- Loading or unloading an IP-adapter rebuilds processors as ``type(processor)()``. A processor built
  without arguments is *detached*: it serves the layer through the dit_accel processor bound to that
  attention module (so the layer stays accelerated), or through the family's stock processor when none is.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import compiled, parallel
from .._diffusers import PROCESSOR_ATTRS, ModelHook, apply_rotary_emb
from ..config import SparseAttentionConfig
from ..kernels import BlockPlan, rotary_interleaved
from ..methods.base import AttentionCall, SparseMethod
from ..tracking import ForwardInfo, Geometry, StepTracker, in_backward

__all__ = ["Family", "LayerRecord", "Runtime", "SparseAttnProcessorBase", "bind", "bound_processor", "unbind"]

logger = logging.getLogger("dit_accel")


@functools.cache
def _log_once(msg: str) -> None:
    logger.warning(msg)


@dataclass(frozen=True, eq=False)
class Family:
    """A supported diffusers transformer family.

    Attributes:
        name: family name ("wan", "flux", ...).
        transformer_classes: names of the diffusers transformer classes of the family.
        processors: stock processor class name -> the dit_accel processor class that replaces it.
        select: ``select(path)`` is True for the attention module paths (as in ``named_modules``) to replace.
        geometry: ``geometry(transformer, forward_arguments) -> Geometry``.
        has_set_attn_processor: whether the transformer offers ``set_attn_processor`` (Mochi does not).
        video: the self-attention sequence spans several latent frames (False: one image).
        defaults: per-family defaults of the methods and patterns, by their name ("radial", "rettention",
            "window", ...): knob -> value, including config fields (``dense_steps``, ``dense_layers``).
            A method fills what the user left unset from here (``SparseMethod.configure``).
        fused_blocks: ``fused_blocks(transformer)`` -> [(path, block, forward)] for ``fuse_blocks=True``:
            the blocks whose stock forward ``forward(block, *args, **kwargs)`` replaces with the same
            arithmetic in fused kernels; None: the family has none.
    """

    name: str
    transformer_classes: tuple[str, ...]
    processors: Mapping[str, type]
    select: Callable[[str], bool]
    geometry: Callable[[torch.nn.Module, dict], Geometry]
    has_set_attn_processor: bool = True
    video: bool = True
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fused_blocks: Callable[[torch.nn.Module], list] | None = None


FUSED_BLOCK_HOOK_NAME = "dit_accel_fused_block"


class FusedBlockHook(ModelHook):
    """Runs a block's fused forward in place of its stock one (``SparseAttentionConfig.fuse_blocks``).

    Only where it wraps the block's own forward directly: a hook registered on the block before it (a step
    cache that may skip the block) stays in charge, and the stock forward runs beneath it. Under
    ``torch.compile`` the stock forward runs too; the compiler fuses it.
    """

    def __init__(self, forward: Callable):
        super().__init__()
        self.forward = forward
        self.active = True  # False once removed while another hook wraps it: a pass-through

    def new_forward(self, module, *args, **kwargs):
        below = self.fn_ref.original_forward
        direct = (
            getattr(below, "__func__", None) is type(module).forward
            and getattr(below, "__self__", None) is module
        )
        if not (self.active and direct) or torch.compiler.is_compiling():
            return below(*args, **kwargs)
        return self.forward(module, *args, **kwargs)


@dataclass
class LayerRecord:
    """One attention call as the stats see it."""

    run: int
    component: str
    context: str
    step: int
    layer: str
    kind: str
    density: float
    time: object = None


class Runtime:
    """Shared by the processors of one handle: config, method, step tracker and the call records.

    Args:
        config: the run's configuration.
        method: the method instance (owns the plan cache).
        tracker: the step tracker shared by the handle's transformers.
    """

    def __init__(self, config: SparseAttentionConfig, method: SparseMethod, tracker: StepTracker):
        self.config = config
        self.method = method
        self.tracker = tracker
        self.records: list[LayerRecord] = []
        self._records_run: int | None = None
        tracker.add_listener(self._on_new_run)

    def _on_new_run(self, run: int) -> None:
        self.method.new_run()

    def attend(
        self,
        processor: SparseAttnProcessorBase,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: str,
        dense_fn: Callable[[], torch.Tensor],
        kv_len: torch.Tensor | None,
        text_len: int | None,
        text_position: str | None,
    ) -> torch.Tensor:
        info = self.tracker.current
        capture = None
        if info is None:
            recomputing = in_backward()
            capture = processor._take_capture(q) if recomputing else None
            if capture is None and recomputing:
                raise RuntimeError(
                    f"{type(processor).__name__} ({processor.layer}): a checkpointed block is "
                    "recomputed in backward for a forward dit_accel did not record. dit_accel records "
                    "forwards run with grad enabled on a transformer with enable_gradient_checkpointing() "
                    "on, and replays each once: checkpointing applied by other means, or a second backward "
                    "through the same graph (retain_graph=True), is not supported. Use diffusers' "
                    "enable_gradient_checkpointing(), or dit_accel.remove(...) before training."
                )
            if capture is None:
                raise RuntimeError(
                    f"{type(processor).__name__} ({processor.layer}) was called outside a tracked "
                    "transformer forward: the dit_accel step tracker hook is missing from the transformer. "
                    "Install the processors with dit_accel.apply(...) or "
                    "dit_accel.attn_processors(transformer)."
                )
            info = capture.info
        device_type = q.device.type
        if torch.is_autocast_enabled(device_type):
            # The stock op (scaled_dot_product_attention) runs in the autocast dtype; so do the kernels.
            dtype = torch.get_autocast_dtype(device_type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if text_len is None:
            text_len, text_position = info.text_len, info.text_position
        record = replay = None
        if capture is not None:
            replay = list(capture.plans)
        elif self.tracker.recording:
            record = []
        call = _Call(
            record=record,
            replay=replay,
            layer=processor.layer,
            layer_index=processor.layer_index,
            num_layers=processor.num_layers,
            info=info,
            q=q,
            k=k,
            v=v,
            layout=layout,
            dense_fn=dense_fn,
            kv_len=kv_len,
            text_len=text_len,
            text_position=text_position,
            config=self.config,
        )
        method = self.method
        call.block_q, call.block_k = method.blocks_for(call)
        if capture is not None:
            call.entry = capture.entry
            out = method.attention(q, k, v, call)
            if replay:
                raise RuntimeError(
                    f"{processor.layer}: the checkpoint recomputation ran {len(capture.plans) - len(replay)} "
                    f"plan passes, the forward ran {len(capture.plans)}: the method "
                    f"{type(method).__name__} did not repeat its forward from the recorded state"
                )
            return out
        call.entry = method.cache.entry(info.context, processor.layer, method.plan_key(call))
        before = dataclasses.replace(call.entry, state=dict(call.entry.state)) if record is not None else None
        timer = None
        if self.config.timing:
            if q.is_cuda:
                timer = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                timer[0].record()
            else:
                timer = time.perf_counter()
        out = method.attention(q, k, v, call)
        if timer is not None:
            if isinstance(timer, tuple):
                timer[1].record()
            else:
                timer = (time.perf_counter() - timer) * 1e3
        if record is not None:
            processor._keep_capture(_Capture(info, before, tuple(record), tuple(q.shape)))
        self._record(call, timer)
        return out

    def _records_of(self, info: ForwardInfo) -> list[LayerRecord]:
        if self._records_run != info.run:
            self.records = []
            self._records_run = info.run
        return self.records

    def replay_records(self, records: list[LayerRecord], info: ForwardInfo) -> None:
        """Add the records of a forward replayed from a CUDA graph (``dit_accel.graphs``), stamped with the
        run, component, context and step of ``info``."""
        self._records_of(info).extend(
            dataclasses.replace(
                r, run=info.run, component=info.component, context=info.context, step=info.step
            )
            for r in records
        )

    def _record(self, call: AttentionCall, timer) -> None:
        info = call.info
        if call.label is not None:
            kind = call.label
        elif not call.events:
            kind = "custom"
        else:
            kind = "+".join(dict.fromkeys(kind for kind, _ in call.events))
        density = sum(d for _, d in call.events) if call.events else float("nan")
        self._records_of(info).append(
            LayerRecord(info.run, info.component, info.context, info.step, call.layer, kind, density, timer)
        )


@dataclass(frozen=True)
class _Capture:
    """What one recorded attention call saw: replayed by its checkpoint recomputation."""

    info: ForwardInfo
    entry: object
    plans: tuple[BlockPlan, ...]
    q_shape: tuple[int, ...]


class _Call(AttentionCall):
    """An :class:`AttentionCall` that records the plans it runs (sparse, refresh and statistics passes, in
    order), or replays recorded ones in that order."""

    def __init__(self, *, record: list | None, replay: list | None, **kwargs):
        super().__init__(**kwargs)
        self._record_plans = record
        self._replay_plans = replay

    def _plan(self, plan: BlockPlan) -> BlockPlan:
        if self._replay_plans is not None:
            if not self._replay_plans:
                raise RuntimeError(
                    f"{self.layer}: the checkpoint recomputation ran more plan passes than the forward"
                )
            return self._replay_plans.pop(0)
        if self._record_plans is not None:
            self._record_plans.append(plan)
        return plan

    def run_sparse(self, plan: BlockPlan, *args, **kwargs):
        return super().run_sparse(self._plan(plan), *args, **kwargs)

    def run_refresh(self, plan: BlockPlan, *args, **kwargs):
        return super().run_refresh(self._plan(plan), *args, **kwargs)

    def run_statistics(self, plan: BlockPlan, *args, **kwargs):
        return super().run_statistics(self._plan(plan), *args, **kwargs)


# attention module -> the dit_accel processor installed for it (detached processors serve through it).
_BOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# Recorded calls kept per processor, so forwards whose backward never comes (grad on, no backward) do not pile
# up.
_MAX_CAPTURES = 8


def bind(module: torch.nn.Module, processor: SparseAttnProcessorBase) -> None:
    """Make ``processor`` the one that detached processors on ``module`` serve through."""
    _BOUND[module] = processor


def unbind(module: torch.nn.Module, processor: SparseAttnProcessorBase) -> None:
    if _BOUND.get(module) is processor:
        del _BOUND[module]


def bound_processor(module: torch.nn.Module) -> SparseAttnProcessorBase | None:
    return _BOUND.get(module)


class SparseAttnProcessorBase:
    """Base of the dit_accel processors: one instance per replaced attention layer.

    Args:
        runtime: the handle's :class:`Runtime`. None (a processor built without arguments, as diffusers does
            when it loads or unloads an IP-adapter): a detached processor (see the module docstring).
        layer: unique layer name.
        layer_index, num_layers: position among the replaced layers of the transformer.
        stock: the processor this one replaces; it serves the calls this one does not handle (e.g. a
            cross-attention call of a module whose self-attention is replaced). Default: a new
            ``stock_class()``.
    """

    _attention_backend = None
    _parallel_config = None
    stock_class: Callable[[], object] | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("__call__")
        if call is None:
            return

        # Detached processors serve through the bound one. functools.wraps keeps the family's signature,
        # which diffusers reads to decide which keyword arguments (rotary embeddings, masks) to pass.
        @functools.wraps(call)
        def __call__(self, attn, *args, **kwargs):
            if self.runtime is None:
                return self._detached_call(attn, *args, **kwargs)
            return call(self, attn, *args, **kwargs)

        cls.__call__ = __call__

    def __init__(
        self,
        runtime: Runtime | None = None,
        layer: str | None = None,
        layer_index: int = 0,
        num_layers: int = 1,
        stock=None,
    ):
        if runtime is not None and (layer is None or stock is None):
            raise TypeError(f"{type(self).__name__} with a runtime needs its layer name and stock processor")
        self.runtime = runtime
        self.layer = layer
        self.layer_index = layer_index
        self.num_layers = num_layers
        self.stock = stock if stock is not None else type(self).stock_class()
        self._captures: list[_Capture] = []
        self.slot = compiled.register(self)
        if runtime is not None:
            for name in PROCESSOR_ATTRS:
                setattr(self, name, getattr(stock, name, None))

    def __repr__(self) -> str:
        if self.runtime is None:
            return f"{type(self).__name__}(detached)"
        return f"{type(self).__name__}(layer={self.layer!r}, method={self.runtime.method.name!r})"

    def __reduce_ex__(self, protocol):
        if self.runtime is None:
            return super().__reduce_ex__(protocol)
        raise TypeError(
            f"cannot pickle or copy a transformer with dit_accel applied ({type(self).__name__} on "
            f"{self.layer}): call dit_accel.remove(...) on it first, and dit_accel.apply(...) again on the "
            "loaded or copied model"
        )

    def _detached_call(self, attn, *args, **kwargs):
        live = _BOUND.get(attn)
        if live is not None:
            for name in PROCESSOR_ATTRS:
                if name in self.__dict__:
                    setattr(live, name, self.__dict__[name])
            return live(attn, *args, **kwargs)
        _log_once(
            f"{type(self).__name__} was built without a dit_accel handle (as diffusers does when it loads or "
            f"unloads an IP-adapter) on a layer dit_accel does not manage: it runs the stock "
            f"{type(self.stock).__name__}"
        )
        return self._run_stock(attn, *args, **kwargs)

    def _keep_capture(self, capture: _Capture) -> None:
        self._captures.append(capture)
        del self._captures[:-_MAX_CAPTURES]

    def _take_capture(self, q: torch.Tensor) -> _Capture | None:
        if not self._captures:
            return None
        capture = self._captures.pop()
        if capture.q_shape != tuple(q.shape):
            raise RuntimeError(
                f"{self.layer}: a checkpoint recomputation has q of shape {tuple(q.shape)}, the latest "
                f"recorded forward had {capture.q_shape}; recomputations must follow their forwards in "
                "reverse order"
            )
        return capture

    def _run_stock(self, *args, **kwargs):
        for name in PROCESSOR_ATTRS:
            if hasattr(self.stock, name):
                setattr(self.stock, name, getattr(self, name))
        return self.stock(*args, **kwargs)

    def _rotary(self, query, key, cos, sin, convention: str, rotary_len: int | None = None):
        """Rotated (query, key) [B, S, H, D] with [1 or B, rotary_len, 1, D] tables: on the GPU one Triton
        pass over both, bit-exact with the stock ops (``dit_accel.kernels.rotary_interleaved``); the stock
        arithmetic on the CPU, with ``backend="torch"`` and under torch.compile (whose inductor fuses it)."""
        backend = "auto" if query.is_cuda and self.runtime.config.backend != "torch" else "torch"
        return rotary_interleaved(query, key, cos, sin, backend, convention=convention, rotary_len=rotary_len)

    def _rotary_pairs(self, query, key, freqs, rotary_len: int | None = None):
        """``apply_rotary_emb(x, freqs, sequence_dim=1)`` (diffusers' embeddings) on the first ``rotary_len``
        tokens of query and key (all of them by default), the rest unchanged: fused where ``freqs`` is the
        (cos, sin) pair of [S, D] tables that HunyuanVideo and Flux pass, the stock function otherwise."""
        if isinstance(freqs, tuple) and len(freqs) == 2 and all(f.dim() == 2 for f in freqs):
            cos, sin = (f.to(query.device)[None, :, None] for f in freqs)
            return self._rotary(query, key, cos, sin, "apply_rotary_emb", rotary_len)

        def rotate(x):
            if rotary_len is None or rotary_len == x.shape[1]:
                return apply_rotary_emb(x, freqs, sequence_dim=1)
            head = apply_rotary_emb(x[:, :rotary_len], freqs, sequence_dim=1)
            return torch.cat([head, x[:, rotary_len:]], dim=1)

        return rotate(query), rotate(key)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: str,
        dense_fn: Callable[[], torch.Tensor],
        kv_len: torch.Tensor | None = None,
        text_len: int | None = 0,
        text_position: str | None = None,
        attention_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of q, k, v ([B, S, H, D] for "bshd", [B, H, S, D] for "bhsd") by the handle's method.

        ``text_len=None`` takes the text length and position from the forward (Flux single blocks). Under
        diffusers' context parallelism q, k, v are this rank's sequence shard (:mod:`dit_accel.parallel`).
        ``key_mask`` (bool [B, S_k], instead of ``kv_len``): the keys a padded-text family attends to. Where
        it keeps a prefix of each row the method runs with those lengths as ``kv_len``; otherwise the call
        runs ``dense_fn`` (stock attention with the mask). Deciding reads the mask on the host, so under
        torch.compile it happens inside the opaque attention op, not in the graph.
        """
        if key_mask is not None:
            if torch.compiler.is_compiling() and self._parallel_config is None and attention_mask is None:
                return compiled.attend(
                    self, q, k, v, layout=layout, kv_len=None, text_len=text_len, text_position=text_position,
                    key_mask=key_mask,
                )  # fmt: skip
            kv_len = prefix_lengths(key_mask)
            if kv_len is None:
                attention_mask = key_mask
        if self._parallel_config is not None:
            return parallel.attend(
                self, q, k, v, layout=layout, dense_fn=dense_fn, kv_len=kv_len, text_len=text_len,
                text_position=text_position, attention_mask=attention_mask,
            )  # fmt: skip
        return self._run_method(
            q, k, v, layout=layout, dense_fn=dense_fn, kv_len=kv_len, text_len=text_len,
            text_position=text_position, attention_mask=attention_mask,
        )  # fmt: skip

    def _run_method(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        layout: str,
        dense_fn: Callable[[], torch.Tensor],
        kv_len: torch.Tensor | None,
        text_len: int | None,
        text_position: str | None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The handle's method on q, k, v holding every token of the sequence (see :meth:`_attend`)."""
        if attention_mask is not None:
            _log_once(
                f"{type(self).__name__}: an attention mask the method cannot express was passed; "
                "running stock attention for those calls"
            )
            return dense_fn()
        if torch.compiler.is_compiling():
            # One opaque node: the method's per-call Python stays out of the graph (dit_accel.compiled).
            return compiled.attend(
                self, q, k, v, layout=layout, kv_len=kv_len, text_len=text_len, text_position=text_position
            )
        return self.runtime.attend(
            self,
            q,
            k,
            v,
            layout=layout,
            dense_fn=dense_fn,
            kv_len=kv_len,
            text_len=text_len,
            text_position=text_position,
        )


def prefix_lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """int32 [B] valid lengths when a boolean key mask [B, N] keeps a prefix of each row, else None."""
    mask = mask.to(torch.bool)
    lengths = mask.sum(-1, dtype=torch.int32)
    prefix = torch.arange(mask.shape[-1], device=mask.device)[None, :] < lengths[:, None]
    return lengths if torch.equal(prefix, mask) else None
