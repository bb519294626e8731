"""The state ledger: everything a method keeps per (CFG context, layer) during a run, under one byte budget.

An entry per (context, layer) holds the layer's current block plan and named state (a cached LSE, a softmax
correction). Plans are always kept (every sparse step needs one); state goes through :meth:`StateLedger.place`
and :meth:`StateLedger.store`, which enforce ``max_bytes`` over the state held on the device:

1. Preferred precision when the whole run's state is predicted to fit. ``place(name, sizes, count)`` gets
   the bytes of one entry's value in each storage dtype the method accepts (in order of preference) and how
   many entries of that name the run will hold (layers x CFG contexts). The first dtype whose predicted total,
   plus the predicted totals of the other names already placed this run, fits the budget is the run's
   choice for that name.
2. Each value is then stored in that dtype while it fits beside what is held; otherwise in the later
   (smaller) dtypes of the list; otherwise, when offloading is on and the tensors live on a GPU, on the
   host (pinned memory, copied back ahead of use by :meth:`prefetch`); otherwise it is dropped, which
   is logged once and counted (the method then does without it, e.g. adaspa skips that layer's cached
   searches, re-ttention runs that layer uncorrected).

``max_bytes``: None is unbounded; "auto" is, on a GPU, the memory free at the run's first placement (plus
what the ledger already holds) minus 10% of the device's memory as headroom for the rest of the step, and
unbounded on the CPU. :meth:`report` gives bytes per name, plans, totals, the run's peak, the host bytes and
the counts of downgraded, offloaded and dropped values; every entry is dropped when a new run starts.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..kernels import BlockPlan, SoftmaxCorrection

__all__ = ["CacheEntry", "Placement", "StateLedger"]

logger = logging.getLogger("dit_accel")

AUTO_HEADROOM = 0.10  # fraction of the device kept free by max_bytes="auto"


@functools.cache
def _log_once(msg: str) -> None:
    logger.warning(msg)


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, SoftmaxCorrection):
        return value.nbytes()
    return 0


def _device_of(value) -> torch.device | None:
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, SoftmaxCorrection):
        return value.device
    return None


def _same_layout(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _copy_into(held, value) -> bool:
    """Write ``value`` into ``held`` when both have the same layout (type, shapes, dtypes, devices)."""
    if isinstance(held, torch.Tensor) and isinstance(value, torch.Tensor):
        pairs = [(held, value)]
    elif isinstance(held, SoftmaxCorrection) and isinstance(value, SoftmaxCorrection):
        pairs = [
            (held.rho, value.rho),
            (held.residual, value.residual),
            (held.residual_scale, value.residual_scale),
        ]
    else:
        return False
    if not all(_same_layout(a, b) for a, b in pairs):
        return False
    for a, b in pairs:
        if a is not None:
            a.copy_(b)
    return True


def _map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, SoftmaxCorrection):
        return SoftmaxCorrection(
            fn(value.rho),
            fn(value.residual),
            fn(value.residual_scale) if value.residual_scale is not None else None,
        )
    raise TypeError(f"the ledger keeps tensors and SoftmaxCorrection values, got {type(value).__name__}")


@dataclass(eq=False)
class CacheEntry:
    """What a method keeps for one (context, layer) during a run.

    Attributes:
        key: the plan key (geometry, block sizes, batch) the entry was built for.
        plan: the current plan (None: none built yet).
        density: the plan's density, computed once when it is set.
        step: the step the plan was built at.
        state: named per-(context, layer) values (cached LSE, correction); values stored through the ledger
            are counted against its budget. Their identity is part of a CUDA graph's key
            (:func:`dit_accel.graphs.ledger_state`).
        marks: the method's host bookkeeping about its state (the step a statistic was refreshed at, the
            plan it belongs to). Not counted and not part of a graph's key: a method whose graphed kernels
            depend on a mark covers it by ``graph_key`` or writes it to the device in ``prepare_replay``.
        context, layer: the entry's place.
    """

    key: Hashable = None
    plan: BlockPlan | None = None
    density: float | None = None
    step: int | None = None
    state: dict[str, Any] = field(default_factory=dict)
    marks: dict[str, Any] = field(default_factory=dict)
    context: str = ""
    layer: str = ""

    def set_plan(self, plan: BlockPlan, step: int | None, density: float | None = None) -> None:
        """Make ``plan`` current; pass ``density`` when known (reading it from the plan syncs the device)."""
        self.plan, self.density, self.step = plan, plan.density() if density is None else density, step


@dataclass(frozen=True)
class Placement:
    """Where :meth:`StateLedger.place` puts a value: its storage dtype and whether it lives on the host."""

    dtype: torch.dtype
    host: bool = False


class StateLedger:
    """:class:`CacheEntry` per (context, layer) and the byte budget over their state (module docstring).

    Args:
        max_bytes: budget for state held on the device: an int, None (unbounded) or "auto".
        offload: keep values that do not fit on the device in pinned host memory instead of dropping them
            (GPU tensors only).
    """

    def __init__(self, max_bytes: int | str | None = None, offload: bool = True):
        if not (max_bytes is None or max_bytes == "auto" or (isinstance(max_bytes, int) and max_bytes >= 0)):
            raise ValueError(f"max_bytes must be None, 'auto' or an int >= 0, got {max_bytes!r}")
        if isinstance(max_bytes, bool):
            raise ValueError(f"max_bytes must be None, 'auto' or an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.offload = bool(offload)
        self.names: set[str] = set()  # state names always reported (0 when none is held)
        self._entries: dict[tuple[str, str], CacheEntry] = {}
        self._last_report: dict = {}
        self._copy_stream = None
        self._staged: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._reset_run()

    def _reset_run(self) -> None:
        self._budget: int | None = None
        self._budget_known = False
        self._predicted: dict[str, int] = {}
        self._choice: dict[str, Placement] = {}
        self._peak = 0
        self.downgraded: dict[str, int] = {}
        self.offloaded: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self._staged.clear()

    # --- entries ------------------------------------------------------------------------------------
    def entry(self, context: str, layer: str, key: Hashable) -> CacheEntry:
        """The entry of (context, layer); one whose key changed starts over."""
        e = self._entries.get((context, layer))
        if e is None or e.key != key:
            e = CacheEntry(key=key, context=context, layer=layer)
            self._entries[(context, layer)] = e
        return e

    def entries(self) -> dict[tuple[str, str], CacheEntry]:
        return dict(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """A new run: every entry dropped; :meth:`report` keeps the figures of the run that ended."""
        if self._entries:
            self._last_report = self._report_now()
        self._entries.clear()
        self._reset_run()

    # --- budget -------------------------------------------------------------------------------------
    def budget(self, device: torch.device | None = None) -> int | None:
        """This run's budget in bytes (None: unbounded), fixed at its first call."""
        if not self._budget_known:
            self._budget_known = True
            if self.max_bytes == "auto":
                if device is not None and device.type == "cuda":
                    free, total = torch.cuda.mem_get_info(device)
                    self._budget = max(int(free - AUTO_HEADROOM * total) + self.held(), 0)
                else:
                    self._budget = None
            else:
                self._budget = self.max_bytes
        return self._budget

    def held(self, exclude: tuple[CacheEntry, str] | None = None) -> int:
        """Bytes of state held on the device (the value ``exclude`` = (entry, name) not counted)."""
        total = 0
        for e in self._entries.values():
            for name, value in e.state.items():
                if exclude is not None and e is exclude[0] and name == exclude[1]:
                    continue
                if _device_of(value) is not None and not self._is_host(e, name):
                    total += _nbytes(value)
        return total

    def _is_host(self, entry: CacheEntry, name: str) -> bool:
        return name in entry.state.get("_host", ())

    def place(
        self,
        entry: CacheEntry,
        name: str,
        sizes: Mapping[torch.dtype, int],
        count: int,
        device: torch.device,
    ) -> Placement | None:
        """Where a new value of ``name`` for ``entry`` goes (None: dropped; counted and logged once).

        Args:
            sizes: bytes of the value per acceptable storage dtype, most preferred first.
            count: values of this name the run will hold (layers x contexts): the prediction in step 1.
            device: the device the value is computed on.
        """
        if not sizes:
            raise ValueError("place needs at least one storage dtype")
        dtypes = list(sizes)
        budget = self.budget(device)
        if budget is None:
            return Placement(dtypes[0])
        choice = self._choice.get(name)
        if choice is None:
            others = sum(v for k, v in self._predicted.items() if k != name)
            chosen = next((d for d in dtypes if others + sizes[d] * count <= budget), dtypes[-1])
            self._choice[name] = choice = Placement(chosen)
            self._predicted[name] = sizes[chosen] * count
        held = self.held(exclude=(entry, name))
        start = dtypes.index(choice.dtype)
        for d in dtypes[start:]:
            if held + sizes[d] <= budget:
                if d != dtypes[0]:
                    self.downgraded[name] = self.downgraded.get(name, 0) + 1
                return Placement(d)
        if self.offload and device.type == "cuda":
            self.offloaded[name] = self.offloaded.get(name, 0) + 1
            _log_once(
                f"dit_accel: the state budget ({budget / 2**30:.2f} GiB on {device}) cannot hold every "
                "layer's "
                f"{name!r}; the rest is kept in host memory and copied back ahead of use"
            )
            return Placement(choice.dtype, host=True)
        self.dropped[name] = self.dropped.get(name, 0) + 1
        _log_once(
            f"dit_accel: the state budget ({budget} bytes) cannot hold every layer's {name!r}, even in "
            f"{dtypes[-1]}; layers over it do without (set max_state_bytes higher, or a smaller state dtype)"
        )
        return None

    # --- values -------------------------------------------------------------------------------------
    def store(
        self, entry: CacheEntry, name: str, value, placement: Placement | None = None, in_place: bool = False
    ) -> None:
        """Keep ``value`` as ``entry.state[name]`` (on the host when ``placement.host``).

        ``in_place``: when the value held under ``name`` is on the device with ``value``'s layout (shapes,
        dtypes, device), write ``value`` into it instead. The held object, and so its identity in a CUDA
        graph's key, stays: graphs captured over it read the new values (re-ttention's refreshed statistics
        under ``cuda_graphs=True``). Otherwise ``value`` replaces it as usual.
        """
        host = placement is not None and placement.host
        held = entry.state.get(name)
        if in_place and not host and held is not None and not self._is_host(entry, name):
            if _copy_into(held, value):
                self._staged.pop((entry.context, entry.layer, name), None)
                return
        hosted = set(entry.state.get("_host", ()))
        hosted.discard(name)
        if host:
            value = self._to_host(value)
            hosted.add(name)
        entry.state[name] = value
        if hosted:
            entry.state["_host"] = tuple(sorted(hosted))
        else:
            entry.state.pop("_host", None)
        self._staged.pop((entry.context, entry.layer, name), None)
        self.note_peak()

    def get(self, entry: CacheEntry, name: str, device: torch.device | None = None):
        """``entry.state[name]`` on ``device`` (a host value is copied back, or taken from its prefetch)."""
        value = entry.state.get(name)
        if value is None or not self._is_host(entry, name) or device is None or device.type != "cuda":
            return value
        staged = self._staged.pop((entry.context, entry.layer, name), None)
        if staged is None:
            self.prefetch(entry, name, device)
            staged = self._staged.pop((entry.context, entry.layer, name))
        on_device, event = staged
        torch.cuda.current_stream(device).wait_event(event)
        return on_device

    def release(self, entry: CacheEntry, name: str) -> None:
        entry.state.pop(name, None)
        hosted = tuple(n for n in entry.state.get("_host", ()) if n != name)
        if hosted:
            entry.state["_host"] = hosted
        else:
            entry.state.pop("_host", None)
        self._staged.pop((entry.context, entry.layer, name), None)

    def prefetch(self, entry: CacheEntry, name: str, device: torch.device) -> None:
        """Start copying a host value of ``entry`` back to ``device`` on a side stream (no-op otherwise)."""
        key = (entry.context, entry.layer, name)
        if key in self._staged or not self._is_host(entry, name) or device.type != "cuda":
            return
        stream = self._stream(device)
        with torch.cuda.stream(stream):
            on_device = _map(entry.state[name], lambda t: t.to(device, non_blocking=True))
            event = torch.cuda.Event()
            event.record(stream)
        self._staged[key] = (on_device, event)

    def next_host_entry(self, entry: CacheEntry, name: str) -> CacheEntry | None:
        """The entry after ``entry`` (in first-call order, wrapping around) whose ``name`` is on the host."""
        order = list(self._entries.values())
        ids = [id(e) for e in order]
        if id(entry) not in ids:
            return None
        i = ids.index(id(entry))
        for e in order[i + 1 :] + order[: i + 1]:
            if e is not entry and self._is_host(e, name):
                return e
        return None

    def _stream(self, device):
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        return self._copy_stream

    def _to_host(self, value):
        device = _device_of(value)
        if device is None or device.type != "cuda":
            return value
        stream = self._stream(device)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))

        def copy(t):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            t.record_stream(stream)
            return host

        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            return _map(value, copy)

    # --- report -------------------------------------------------------------------------------------
    def note_peak(self) -> None:
        """Record the current total in the run's peak (called when plans or state change)."""
        self._totals()

    def _totals(self) -> tuple[dict[str, int], int, int]:
        """Device bytes per state name, plan bytes and host bytes held now; the run's peak updated."""
        plans: dict[int, int] = {}
        by_name: dict[str, int] = {}
        host = 0
        seen: set[int] = set()
        for e in self._entries.values():
            if e.plan is not None:
                plans[id(e.plan)] = e.plan.nbytes()
            hosted = e.state.get("_host", ())
            for name, value in e.state.items():
                if id(value) in seen or _device_of(value) is None:
                    continue
                seen.add(id(value))
                if name in hosted:
                    host += _nbytes(value)
                else:
                    by_name[name] = by_name.get(name, 0) + _nbytes(value)
        plan_bytes = sum(plans.values())
        self._peak = max(self._peak, plan_bytes + sum(by_name.values()))
        return by_name, plan_bytes, host

    def _report_now(self) -> dict:
        held, plans, host = self._totals()
        by_name = dict.fromkeys(sorted(self.names), 0)
        by_name.update(held)
        state = sum(by_name.values())
        return {
            **by_name,
            "plans": plans,
            "state": state,
            "total": plans + state,
            "peak": self._peak,
            "host": host,
            "budget": self._budget if self._budget_known else None,
            "downgraded": dict(self.downgraded),
            "offloaded": dict(self.offloaded),
            "dropped": dict(self.dropped),
        }

    def report(self) -> dict:
        """Bytes per state name, ``plans``, ``state``, ``total`` (device), ``peak``, ``host``, ``budget``
        and the counts ``downgraded`` / ``offloaded`` / ``dropped`` per name. Between runs: the figures at
        the end of the latest run that kept anything ({} before any)."""
        return self._report_now() if self._entries else dict(self._last_report)
