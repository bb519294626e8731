"""What every family's processor shares: the runtime they report to, the processor base, the family spec.

A family module (``wan.py``, ``flux.py``, ...) defines processors that mirror the stock diffusers processor
line for line around the attention op and replace that op with ``self._attend(q, k, v, ...)``, passing the
stock op as a closure for dense calls. It also states which attention modules it replaces and how to read the
latent grid and text length from the transformer's forward arguments (:class:`Family`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import SparseAttentionConfig
from ..methods.base import AttentionCall, SparseMethod
from ..tracking import Geometry, StepTracker

__all__ = ["Family", "LayerRecord", "Runtime", "SparseAttnProcessorBase"]

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
    """

    name: str
    transformer_classes: tuple[str, ...]
    processors: Mapping[str, type]
    select: Callable[[str], bool]
    geometry: Callable[[torch.nn.Module, dict], Geometry]
    has_set_attn_processor: bool = True
    video: bool = True
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


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
        if info is None:
            raise RuntimeError(
                f"{type(processor).__name__} ({processor.layer}) was called outside a tracked transformer "
                "forward: the dit_accel step tracker hook is missing from the transformer. Install the "
                "processors with dit_accel.apply(...) or dit_accel.attn_processors(transformer)."
            )
        if text_len is None:
            text_len, text_position = info.text_len, info.text_position
        call = AttentionCall(
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
        call.entry = method.cache.entry(info.context, processor.layer, method.plan_key(call))
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
        self._record(call, timer)
        return out

    def _record(self, call: AttentionCall, timer) -> None:
        info = call.info
        if self._records_run != info.run:
            self.records = []
            self._records_run = info.run
        if call.label is not None:
            kind = call.label
        elif not call.events:
            kind = "custom"
        else:
            kind = "+".join(dict.fromkeys(kind for kind, _ in call.events))
        density = sum(d for _, d in call.events) if call.events else float("nan")
        self.records.append(
            LayerRecord(info.run, info.component, info.context, info.step, call.layer, kind, density, timer)
        )


class SparseAttnProcessorBase:
    """Base of the dit_accel processors: one instance per replaced attention layer.

    Args:
        runtime: the handle's :class:`Runtime`.
        layer: unique layer name.
        layer_index, num_layers: position among the replaced layers of the transformer.
        stock: the processor this one replaces; it serves the calls this one does not handle (e.g. a
            cross-attention call of a module whose self-attention is replaced).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, runtime: Runtime, layer: str, layer_index: int, num_layers: int, stock):
        self.runtime = runtime
        self.layer = layer
        self.layer_index = layer_index
        self.num_layers = num_layers
        self.stock = stock
        self._attention_backend = getattr(stock, "_attention_backend", None)
        self._parallel_config = getattr(stock, "_parallel_config", None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, method={self.runtime.method.name!r})"

    def _run_stock(self, *args, **kwargs):
        for name in ("_attention_backend", "_parallel_config"):
            if hasattr(self.stock, name):
                setattr(self.stock, name, getattr(self, name))
        return self.stock(*args, **kwargs)

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
    ) -> torch.Tensor:
        """Attention of q, k, v ([B, S, H, D] for "bshd", [B, H, S, D] for "bhsd") by the handle's method.

        ``text_len=None`` takes the text length and position from the forward (Flux single blocks).
        """
        if self._parallel_config is not None:
            _log_once(f"{type(self).__name__}: context parallelism is not supported; running stock attention")
            return dense_fn()
        if attention_mask is not None:
            _log_once(
                f"{type(self).__name__}: an attention mask the method cannot express was passed; "
                "running stock attention for those calls"
            )
            return dense_fn()
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
