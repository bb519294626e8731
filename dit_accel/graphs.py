"""CUDA graphs over whole transformer forwards (``SparseAttentionConfig(cuda_graphs=True)``).

On small geometries a diffusion transformer is host-bound: at the embedded model's 2,496 tokens the GPU
finishes each kernel long before Python has issued the next, so a sparse call that computes a quarter of the
blocks but costs the host more than a cuDNN call makes the clip slower. A CUDA graph replays a whole captured
forward with one launch, and what then counts is the GPU time the method saves.

A forward may be replayed only when everything its Python would decide is the same as when it was captured.
Per forward, after the step tracker has published the forward's :class:`~dit_accel.tracking.ForwardInfo`,
:class:`CudaGraphs` builds a key from:

- the forward's place: component, CFG layout, batch, grid, text length, step count;
- ``method.graph_key(info, config)``: what the method's decisions at this step depend on besides its
  state, the CFG context included when the forward reads state kept per context (the built-in methods:
  "dense", shared by the CFG contexts, or ("sparse", context)); None runs the forward eagerly (search and
  refresh steps read results back or renew state). A value that changes every step is read by the kernels
  from a device tensor that ``method.prepare_replay(info)`` writes before each capture and replay
  (re-ttention's ramp);
- the identity of every plan and state value in the method's ledger (a new plan or search result is a new
  object, so a new key). A value written in place keeps its identity and its graphs, which then read the new
  contents: re-ttention's refreshed statistics under ``cuda_graphs=True`` (``StateLedger.store(in_place=
  True)``), so its corrected forwards replay across refreshes. Host bookkeeping (``CacheEntry.marks``) is
  not part of the key;
- the arguments: each tensor's shape, dtype, device and strides, every other value as is.

A key seen for the first time runs eagerly (Triton compiles and tunes there, diffusers fills its caches);
when that forward left the ledger as it found it, the next forward with the key is captured and replayed,
and every later one replayed: inputs copied into the graph's static tensors, outputs cloned. Each replay adds
the attention-call records the captured forward made, stamped with the current step, so ``stats()`` reads
as in an eager run. Graphs are dropped when a run starts (weights, LoRA scales or adapters may change
between runs) and when the method's state moves on (a new plan or state object: the old graphs could never
match again), and share one memory pool per transformer.

Forwards that run eagerly instead, with the reason counted in ``stats().graphs``: not on a CUDA device,
under ``torch.compile``, with grad enabled, with ``timing=True`` (per-call events), under context
parallelism, when another hook (a step cache such as FirstBlockCache, offloading; dit_accel's fused-block
hook is not one) is installed on the transformer or its blocks, with state kept in host memory, and when a
capture fails (logged once, that key is not tried again).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable

import torch

__all__ = ["CudaGraphs"]

logger = logging.getLogger("dit_accel")

MAX_GRAPHS = 16  # captured forwards kept per transformer and run (beyond it: eager)


@functools.cache
def _log_once(msg: str) -> None:
    logger.warning(msg)


@functools.cache
def _log_info_once(msg: str) -> None:
    logger.info(msg)


class _Eager(Exception):
    """This forward runs eagerly; the message is the reason counted in the stats."""


def _signature(value, tensors: list, device_type: str) -> object:
    """A hashable description of an argument; its tensors are appended to ``tensors`` in order."""
    if isinstance(value, torch.Tensor):
        if value.device.type != device_type:
            raise _Eager(f"an input tensor is not on a {device_type} device")
        tensors.append(value)
        return ("T", tuple(value.shape), value.dtype, str(value.device), value.stride())
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_signature(v, tensors, device_type) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _signature(v, tensors, device_type)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        raise _Eager(f"an argument of type {type(value).__name__} is not hashable") from None
    return ("V", value)


def _rebuild(value, tensors):
    """``value`` with its tensors taken in order from the iterator ``tensors``."""
    if isinstance(value, torch.Tensor):
        return next(tensors)
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(v, tensors) for v in value)
    if isinstance(value, dict):
        return {k: _rebuild(v, tensors) for k, v in value.items()}
    return value


def _clone_output(value):
    return torch.utils._pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, value)


def ledger_state(method) -> tuple[tuple, list]:
    """(key, refs): the identity of every plan and state value the method's ledger holds, and the objects
    themselves (kept alive by whoever keeps the key, so an id is never reused while it is)."""
    key, refs = [], []
    for (context, layer), entry in method.cache.entries().items():
        if entry.plan is None and not entry.state:
            continue  # what a dense call leaves: no decision reads it
        values = [entry.plan, *entry.state.values()]
        refs.append(entry)
        refs.extend(values)
        key.append((context, layer, id(entry), tuple(id(v) for v in values), tuple(entry.state)))
    return tuple(key), refs


class _Graph:
    """One captured forward: its static inputs and outputs and the call records it replays."""

    def __init__(self, graph, inputs, output, records, refs):
        self.graph = graph
        self.inputs = inputs
        self.output = output
        self.records = records
        self.refs = refs

    def replay(self, tensors: list) -> object:
        for static, new in zip(self.inputs, tensors):
            static.copy_(new)
        self.graph.replay()
        return _clone_output(self.output)


class CudaGraphs:
    """Captured forwards of one transformer (module docstring).

    Args:
        runtime: the handle's :class:`dit_accel.processors.base.Runtime` (method, config, tracker, records).
        hook_name: the name of dit_accel's own hook in diffusers' hook registry (every other hook found on
            the transformer or its modules makes forwards run eagerly).
        block_hook_name: the name of dit_accel's fused-block hook (``fuse_blocks``), allowed on the blocks:
            its forward launches kernels only and is captured with the rest.
    """

    def __init__(self, runtime, hook_name: str, block_hook_name: str | None = None):
        self.runtime = runtime
        self.hook_name = hook_name
        self.block_hook_name = block_hook_name
        self._graphs: dict = {}
        self._clean: dict = {}
        self._failed: set = set()
        self._pool = None
        self._state = None
        self._checked_run: int | None = None
        self._module_reason: str | None = None
        self._counts_run: int | None = None
        self.counts: Counter = Counter()
        runtime.tracker.add_listener(self._on_new_run)

    def _on_new_run(self, run: int) -> None:
        self._graphs.clear()
        self._clean.clear()
        self._failed.clear()
        self._state = None
        self._checked_run = None

    def _prune(self, state) -> None:
        """Drop what was kept for an earlier ledger state. A run's ledger never returns to one (a changed
        value is a new object), and the graphs of one would keep its plans and statistics alive."""
        if state == self._state:
            return
        self._state = state
        for store in (self._graphs, self._clean):
            for key in [k for k in store if k[2] != state]:
                del store[key]
        self._failed = {k for k in self._failed if k[2] == state}

    def report(self) -> dict:
        """Forwards of the latest run by how they ran: ``replayed``, ``captured``, ``eager`` and, per reason,
        ``eager: <reason>``."""
        return dict(self.counts)

    def _count(self, how: str, reason: str | None = None) -> None:
        info = self.runtime.tracker.current
        run = info.run if info is not None else None
        if run != self._counts_run:
            self._counts_run = run
            self.counts = Counter()
        self.counts[how] += 1
        if reason is not None:
            self.counts[f"{how}: {reason}"] += 1
            _log_info_once(f"dit_accel: CUDA graphs: some forwards run eagerly ({reason})")

    # --- the device's graphs (a test double replaces these three) ----------------------------------
    device_type = "cuda"

    def _new_graph(self):
        return torch.cuda.CUDAGraph()

    def _capturing(self, graph):
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local")

    # --- deciding ----------------------------------------------------------------------------------
    def _module_check(self, module: torch.nn.Module) -> str | None:
        if getattr(module, "_parallel_config", None) is not None:
            return "context parallelism"
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            hooks = set(getattr(registry, "hooks", {}) or {})
            if sub is module:
                hooks.discard(self.hook_name)
            hooks.discard(self.block_hook_name)
            if hooks:
                return f"another hook is installed ({sorted(hooks)[0]})"
            if hasattr(sub, "_hf_hook"):
                return "an accelerate hook is installed (offloading)"
        return None

    def _key(self, module, args, kwargs, tensors: list):
        runtime = self.runtime
        info = runtime.tracker.current
        if info is None:
            raise _Eager("no tracked forward")
        if torch.is_grad_enabled():
            raise _Eager("grad is enabled")
        if runtime.config.timing:
            raise _Eager("timing=True")
        if runtime.tracker.recording:
            raise _Eager("gradient checkpointing")
        if self._checked_run != info.run:
            self._checked_run = info.run
            self._module_reason = self._module_check(module)
        if self._module_reason is not None:
            raise _Eager(self._module_reason)
        method_key = runtime.method.graph_key(info, runtime.config)
        if method_key is None:
            raise _Eager("the method searches, refreshes or varies at this step")
        if any("_host" in e.state for e in runtime.method.cache.entries().values()):
            raise _Eager("state kept in host memory")
        state, refs = ledger_state(runtime.method)
        arguments = _signature((args, kwargs), tensors, self.device_type)
        autocast = torch.is_autocast_enabled(self.device_type)
        place = (  # the CFG context is the method's to add (graph_key): a dense forward reads no state of it
            info.component,
            info.cfg,
            info.batch,
            info.grid,
            info.text_len,
            info.text_position,
            info.num_steps,
        )
        key = (
            place,
            method_key,
            state,
            arguments,
            autocast,
            torch.get_autocast_dtype(self.device_type) if autocast else None,
            tensors[0].device if tensors else None,
        )
        return key, refs

    # --- running -----------------------------------------------------------------------------------
    def forward(self, module: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict):
        """``forward(*args, **kwargs)``: replayed, captured and replayed, or run eagerly."""
        tensors: list = []
        try:
            key, refs = self._key(module, args, kwargs, tensors)
        except _Eager as why:
            self._count("eager", str(why))
            return forward(*args, **kwargs)
        self._prune(key[2])
        graph = self._graphs.get(key)
        if graph is not None:
            self._count("replayed")
            info = self.runtime.tracker.current
            self.runtime.method.prepare_replay(info)
            self.runtime.replay_records(graph.records, info)
            return graph.replay(tensors)
        if key in self._failed:
            reason = "capture failed"
        elif key not in self._clean:
            reason = "first forward of its kind"
        elif len(self._graphs) >= MAX_GRAPHS:
            reason = f"{MAX_GRAPHS} graphs captured this run"
        else:
            self.runtime.method.prepare_replay(self.runtime.tracker.current)
            graph = self._capture(key, refs, forward, args, kwargs, tensors)
            if graph is not None:
                self._count("captured")
                self.runtime.replay_records(graph.records, self.runtime.tracker.current)
                return graph.replay(tensors)
            reason = "capture failed"
        self._count("eager", reason)
        out = forward(*args, **kwargs)
        if ledger_state(self.runtime.method)[0] == key[2]:
            self._clean[key] = refs
        return out

    def _capture(self, key, refs, forward, args, kwargs, tensors) -> _Graph | None:
        runtime = self.runtime
        inputs = [t.clone() for t in tensors]
        static_args, static_kwargs = _rebuild((args, kwargs), iter(inputs))
        records_before = len(runtime.records)
        run_before = runtime.tracker.current.run
        graph = self._new_graph()
        try:
            with self._capturing(graph):
                output = forward(*static_args, **static_kwargs)
        except Exception as error:  # noqa: BLE001 - any capture failure falls back to eager, logged
            self._failed.add(key)
            del runtime.records[records_before:]
            _log_once(
                f"dit_accel: a CUDA graph capture of {runtime.tracker.current.component} failed "
                f"({type(error).__name__}: {error}); forwards like it run eagerly"
            )
            return None
        if ledger_state(runtime.method)[0] != key[2] or runtime.tracker.current.run != run_before:
            raise RuntimeError(
                f"dit_accel: the method {type(runtime.method).__name__} changed its state during a forward "
                "captured as a CUDA graph, after an eager forward of the same kind left it unchanged; its "
                "graph_key does not cover what its decisions depend on. Run with cuda_graphs=False."
            )
        records = runtime.records[records_before:]
        del runtime.records[records_before:]
        captured = _Graph(graph, inputs, output, records, refs)
        self._graphs[key] = captured
        return captured
