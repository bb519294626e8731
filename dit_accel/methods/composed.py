"""A method composed of a pattern, the shared schedule and an optional correction (DESIGN.md §4).

- The **pattern** (:class:`Pattern`) says which key blocks each query block computes: built from geometry
  alone (window, radial: one plan per geometry, shared by every layer and CFG context through
  :class:`ComposedMethod`'s plan cache) or searched from attention mass (adaspa's selection: one plan per
  (context, layer), kept in the ledger).
- The **schedule** (:class:`dit_accel.methods.schedule.Schedule`) says, per step, whether a call is dense,
  searches, refreshes the correction or runs sparse.
- The **correction** (:class:`dit_accel.methods.rettention.Correction`) caches softmax statistics at refresh
  steps and corrects the sparse output in between.

Everything kept per (context, layer) goes through the method's :class:`StateLedger` (``method.cache``).
The public method names are presets of these parts: ``window``, ``radial`` and ``adaspa`` are uncorrected,
``rettention`` corrects any of the three patterns.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import torch

from ..config import SparseAttentionConfig
from ..kernels import BlockPlan
from ..tracking import ForwardInfo
from .base import AttentionCall, SparseMethod
from .persist import load_patterns, save_patterns
from .schedule import Phase, Schedule

__all__ = ["ComposedMethod", "Pattern"]

logger = logging.getLogger("dit_accel")

# Shared static plans kept per method instance (different geometries: resolutions, frame counts, devices).
MAX_CACHED_PLANS = 8


@functools.cache
def _log_once(level: int, msg: str) -> None:
    logger.log(level, msg)


class Pattern:
    """Which key blocks each query block computes. Subclasses implement :meth:`build` (static patterns)
    or :meth:`search` (``searched = True``).

    Attributes:
        name: the pattern's name ("window", "radial", "adaspa"); also the key of its per-family defaults
            in ``Family.defaults``.
        searched: the plan comes from attention mass (a dense pass with its LSE), not from geometry.
    """

    name = "pattern"
    searched = False

    def knobs(self) -> dict[str, Any]:
        """The pattern's knob values (for messages and saved patterns)."""
        return {}

    def configure(self, families: tuple, defaults: list[Mapping[str, Any]]) -> None:
        """Check the model families (raise ValueError for one the pattern cannot serve) and fill unset knobs
        from ``defaults`` (one mapping per family: ``family.defaults.get(self.name, {})``)."""

    def key(self, call: AttentionCall) -> Hashable:
        """What a static plan depends on besides the attention shape and block sizes."""
        return (call.grid, call.text_len, call.text_position)

    def max_block(self, grid, q_len: int, k_len: int, text_len: int) -> int | None:
        """The largest block size (tokens) this pattern can draw at this geometry, or None (no limit): the
        automatic block size is capped to it. ``grid`` is the latent grid (T, H, W) or None."""
        return None

    def build(self, call: AttentionCall) -> BlockPlan:
        """The static plan of this call's geometry (B = H = 1 broadcasts), on the CPU or any device."""
        raise NotImplementedError(f"{type(self).__name__} is searched; it has no static plan")

    def search(
        self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, call: AttentionCall
    ) -> tuple[BlockPlan, Any]:
        """A plan from the attention mass of q, k under ``lse`` (searched patterns); (plan, info)."""
        raise NotImplementedError(f"{type(self).__name__} is static; it is not searched")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def _same_defaults(values: list, name: str, families: tuple) -> Any:
    distinct = {repr(v) for v in values}
    if len(distinct) > 1:
        raise ValueError(
            f"one handle over families {[f.name for f in families]} with different {name} defaults"
        )
    return values[0] if values else None


def family_default(families: tuple, section: str, knob: str) -> Any:
    """The families' common default for ``knob`` in ``Family.defaults[section]`` (None when unset)."""
    values = [f.defaults.get(section, {}).get(knob) for f in families]
    values = [v for v in values if v is not None]
    return _same_defaults(values, f"{section}.{knob}", families)


class ComposedMethod(SparseMethod):
    """Pattern x schedule x optional correction (module docstring).

    Args:
        pattern: the :class:`Pattern`.
        correction: a :class:`dit_accel.methods.rettention.Correction`, or None.
        warmup: the dense warm-up as a step count (int) or a fraction of the run (float, rounded half up);
            None: the config's ``dense_steps`` when set (its rounding), else ``default_warmup``. Giving both
            is an error.
        search_at: cached-search steps of a searched pattern (fractions or indices).
        dense_last_steps: the last this-many steps run dense.
        max_state_bytes: budget of the state ledger (overrides the config's ``max_state_bytes``).
    """

    name = "composed"
    default_warmup: float | int = 0

    def __init__(
        self,
        pattern: Pattern,
        correction=None,
        *,
        warmup: float | int | None = None,
        search_at: tuple[float | int, ...] | float | int = (),
        dense_last_steps: int = 0,
        max_state_bytes: int | str | None = None,
    ):
        super().__init__()
        if isinstance(search_at, (int, float)):
            search_at = (search_at,)
        self.pattern = pattern
        self.correction = correction
        self.warmup = warmup
        self.search_at = tuple(search_at)
        self.dense_last_steps = dense_last_steps
        self._state_bytes = max_state_bytes
        if pattern.searched:
            self.cache.names.add("lse")
        if correction is not None:
            self.cache.names.add("correction")
        self.plan_builds = 0
        self.models: dict[str, tuple[str, int]] = {}
        self.loaded = None
        self._save_path = None
        self._history: dict[tuple[str, str], tuple[Hashable, list]] = {}
        self._plans: OrderedDict[tuple, tuple[BlockPlan, float]] = OrderedDict()
        self._densities: dict[int, float] = {}  # id(shared static plan) -> its density
        self._schedules: dict[tuple, Schedule] = {}
        # (info, config, phase) of the latest forward asked: every layer of a forward asks the same question.
        self._phase_memo: tuple | None = None
        self._blocks: dict[tuple, tuple[int, int]] = {}  # blocks_for's answers, per geometry
        # Validate the schedule knobs up front.
        Schedule(
            1,
            self.default_warmup if warmup is None else warmup,
            self.search_at,
            pattern.searched,
            correction.refresh_every if correction is not None else None,
            dense_last_steps,
            correction.refresh_at if correction is not None else None,
        )

    def __repr__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.pattern.knobs().items()]
        if self.correction is not None:
            parts += [f"{k}={v!r}" for k, v in self.correction.knobs().items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    # --- configuration -----------------------------------------------------------------------------
    def configure(self, config: SparseAttentionConfig, families: tuple) -> SparseAttentionConfig:
        """Check the families; fill unset config fields (``dense_steps``, ``dense_layers``) from the
        families' defaults for this method, and unset pattern / correction knobs from theirs."""
        self._check_warmup(config)
        self.pattern.configure(families, [f.defaults.get(self.pattern.name, {}) for f in families])
        if self.correction is not None:
            self.correction.configure(families, [f.defaults.get(self.name, {}) for f in families])
        fields = {}
        if config.dense_steps is None and self.warmup is None:
            fields["dense_steps"] = family_default(families, self.name, "dense_steps")
        if config.dense_layers is None:
            fields["dense_layers"] = family_default(families, self.name, "dense_layers")
        fields = {k: v for k, v in fields.items() if v is not None}
        budget = self._state_bytes if self._state_bytes is not None else config.max_state_bytes
        self.cache.max_bytes = budget
        self.cache.offload = config.state_offload
        self.loaded = load_patterns(config.patterns) if config.patterns is not None else None
        self._save_path = config.save_patterns
        self._plans.clear()
        self._densities.clear()
        self._schedules.clear()
        self._phase_memo = None
        self._blocks.clear()
        return dataclasses.replace(config, **fields) if fields else config

    def set_models(self, models: dict[str, tuple[str, int]]) -> None:
        """The handle's transformers ({component: (class name, replaced layers)}): saved with patterns, and
        checked against loaded ones."""
        self.models = dict(models)
        if self.loaded is not None:
            self.loaded.check_models(self.models)

    def new_run(self) -> None:
        if self._save_path is not None and self._history:
            entries = [(c, layer, key, hist) for (c, layer), (key, hist) in self._history.items()]
            meta = {"method": self.name, "knobs": _jsonable(self._knobs()), "models": self.models}
            path = save_patterns(self._save_path, entries, meta)
            logger.info("dit_accel: saved the run's patterns to %s", path)
        self._history.clear()
        super().new_run()

    def _knobs(self) -> dict:
        knobs = dict(self.pattern.knobs())
        if self.correction is not None:
            knobs.update(self.correction.knobs())
        return knobs

    def _set_plan(self, call: AttentionCall, plan: BlockPlan, density: float | None = None) -> None:
        call.entry.set_plan(plan, call.step, density)
        if self._save_path is not None:
            key, history = self._history.setdefault((call.context, call.layer), (call.entry.key, []))
            if not history or history[-1][1] is not plan:
                history.append((call.step, plan))

    def _check_warmup(self, config: SparseAttentionConfig) -> None:
        if self.warmup is not None and config.dense_steps is not None:
            raise ValueError(
                f"{self.name} got its warm-up twice: warmup={self.warmup!r} and "
                f"dense_steps={config.dense_steps!r}; give one of them"
            )

    # --- schedule ----------------------------------------------------------------------------------
    def _warmup_for(self, info: ForwardInfo, config: SparseAttentionConfig) -> float | int | None:
        """The warm-up spec of a forward (None: a fractional dense_steps with an unknown step count)."""
        self._check_warmup(config)
        if config.dense_steps is None:
            return self.default_warmup if self.warmup is None else self.warmup
        return config.num_dense_steps(info.num_steps)

    def schedule_for(self, call: AttentionCall) -> Schedule | None:
        """The run's schedule as seen by this call; None when it cannot be known (dense until it can)."""
        return self.schedule_of(call.info, call.config)

    def schedule_of(self, info: ForwardInfo, config: SparseAttentionConfig) -> Schedule | None:
        """The run's schedule as seen by a forward at ``info``; None when it cannot be known."""
        warmup = self._warmup_for(info, config)
        n = info.num_steps
        last = self.dense_last_steps
        if n is None and warmup is not None and all(isinstance(v, int) for v in (warmup, *self.search_at)):
            # Step indices do not depend on the run's length: any length past every named step reads the
            # same. The last steps cannot be known: they run like the rest.
            n = max(warmup, info.step, *self.search_at) + 2
            if last:
                _log_once(
                    logging.WARNING,
                    f"{self.name} dense_last_steps={last}: the number of steps is unknown (context "
                    f"{info.context!r}); those steps run like the others",
                )
            last = 0
        if n is None or warmup is None:
            _log_once(
                logging.WARNING,
                f"{self.name}: the number of steps is unknown and the warm-up or search steps are fractions; "
                "running dense until it is known (pass num_inference_steps through the pipeline, or give "
                "the steps as indices)",
            )
            return None
        refresh = self.correction.refresh_every if self.correction is not None else None
        refresh_at = self.correction.refresh_at if self.correction is not None else None
        key = (n, warmup, last)
        schedule = self._schedules.get(key)
        if schedule is None:
            schedule = Schedule(n, warmup, self.search_at, self.pattern.searched, refresh, last, refresh_at)
            self._schedules[key] = schedule
            if schedule.warmup_steps >= n and n > 1:
                _log_once(
                    logging.WARNING,
                    f"{self.name}: the warm-up ({warmup!r}) covers the whole {n}-step run; every step runs "
                    "dense",
                )
        return schedule

    def blocks_for(self, call: AttentionCall) -> tuple[int, int]:
        """The config's blocks; the automatic ones capped at the pattern's :meth:`Pattern.max_block`."""
        config = call.config
        key = (config.block_q, config.block_k, call.q_len, call.k_len, call.grid, call.text_len)
        blocks = self._blocks.get(key)
        if blocks is None:
            block_q, block_k = config.blocks_for(call.q_len)
            if config.block_q is None:
                cap = self.pattern.max_block(call.grid, call.q_len, call.k_len, call.text_len or 0)
                if cap is not None and cap < block_q:
                    block_q = block_k = cap
            blocks = self._blocks[key] = (block_q, block_k)
        return blocks

    def dense_reason(self, call: AttentionCall) -> str | None:
        """Why this call runs dense ("dense layer", "warm-up", "last steps"), or None."""
        if call.config.is_dense_layer(call.layer_index, call.num_layers):
            return "dense layer"
        schedule = self.schedule_for(call)
        if schedule is None:
            return "warm-up"
        if call.step >= schedule.num_steps:
            return "warm-up" if schedule.warmup_steps >= schedule.num_steps else None
        if call.step >= schedule.num_steps - schedule.dense_last_steps:
            return "last steps"
        return "warm-up" if schedule.phase(call.step) == "dense" else None

    def phase_for(self, call: AttentionCall) -> Phase:
        """The phase of this call (before the rules for missing plans and corrections)."""
        if call.config.is_dense_layer(call.layer_index, call.num_layers):
            return "dense"
        return self.phase_of(call.info, call.config)

    def phase_of(self, info: ForwardInfo, config: SparseAttentionConfig) -> Phase:
        """The phase of a forward at ``info`` for the layers that are not dense layers."""
        memo = self._phase_memo
        if memo is not None and memo[0] is info and memo[1] is config:
            return memo[2]
        phase = self._phase(info, config)
        self._phase_memo = (info, config, phase)
        return phase

    def _phase(self, info: ForwardInfo, config: SparseAttentionConfig) -> Phase:
        schedule = self.schedule_of(info, config)
        if schedule is None:
            return "dense"
        if info.step >= schedule.num_steps:
            return "dense" if schedule.warmup_steps >= schedule.num_steps else "sparse"
        return schedule.phase(info.step)

    def graph_key(self, info: ForwardInfo, config: SparseAttentionConfig) -> Hashable | None:
        """ "dense" (the same for every CFG context: a dense call reads no state) and ("sparse", context)
        forwards repeat; None (eager) for searches and refreshes, and with a loaded pattern set (its plan
        may change at any step). A correction's ramp, which moves its scale every step, is read by the
        kernel from a device tensor that :meth:`prepare_replay` fills."""
        phase = self.phase_of(info, config)
        if phase == "dense":
            return phase
        if phase != "sparse" or self.loaded is not None:
            return None
        return (phase, info.context)

    def prepare_replay(self, info: ForwardInfo) -> None:
        if self.correction is not None:
            self.correction.prepare_replay(self, info.context, info.step)

    def _searches_after(self, call: AttentionCall) -> bool:
        schedule = self.schedule_for(call)
        return schedule is not None and any(t > call.step for t in schedule.search_steps)

    # --- static plans ------------------------------------------------------------------------------
    def plan(self, call: AttentionCall, device=None) -> tuple[BlockPlan, float]:
        """The shared static plan of this call's geometry and its density, built on first use."""
        key = (self.pattern.key(call), call.q_len, call.k_len, call.block_q, call.block_k, str(device))
        hit = self._plans.get(key)
        if hit is None:
            plan = self.pattern.build(call)
            hit = (plan.to(device) if device is not None else plan), plan.density()
            self.plan_builds += 1
            self._plans[key] = hit
            self._densities[id(hit[0])] = hit[1]
            while len(self._plans) > MAX_CACHED_PLANS:
                evicted, _ = self._plans.popitem(last=False)[1]
                self._densities.pop(id(evicted), None)
        else:
            self._plans.move_to_end(key)
        return hit

    def plan_for(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> BlockPlan | None:
        """The static plan of this call; None when it computes every block (the call then runs dense)."""
        plan, density = self.plan(call, q.device)
        if density >= 1.0:
            _log_once(
                logging.WARNING,
                f"{self.name}: the plan for {call.q_len} tokens (grid {call.grid}, blocks {call.block_q}) "
                "computes every block; those calls run dense (stats kind 'full_plan'). Smaller blocks "
                "(block_q / block_k) give a sparse plan on small grids.",
            )
            return None
        return plan

    def _current_plan(self, q, k, call: AttentionCall) -> BlockPlan | None:
        entry = call.entry
        if entry.plan is None or not self.reuse_plan(entry, call):
            plan = self.plan_for(q, k, call)
            if plan is None:
                return None
            self._set_plan(call, plan, self._densities.get(id(plan)))
        return entry.plan

    # --- attention ---------------------------------------------------------------------------------
    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall
    ) -> torch.Tensor:
        phase = self.phase_for(call)
        entry = call.entry
        corrected = self.correction is not None and self.correction.covers(call)
        if corrected:
            self.correction.preflight(self, call)
        else:
            if phase == "refresh":
                phase = "sparse"
            elif phase == "search_refresh":
                schedule = self.schedule_for(call)
                phase = "fused_search" if call.step == schedule.fused_step else "cached_search"
        if phase == "dense":
            call.label = "dense"
            return call.run_dense()
        loaded = self._loaded_plan(call, q.device)
        if loaded is not None:
            if entry.plan is not loaded:
                entry.set_plan(loaded, call.step)
            if corrected:
                return self.correction.attend(
                    self, loaded, call, refresh=phase in ("refresh", "search_refresh")
                )
            call.label = "sparse"
            return call.run_sparse(loaded)
        if self.pattern.searched:
            if phase not in ("fused_search", "search_refresh") and entry.plan is None:
                _log_once(
                    logging.WARNING,
                    f"{self.name}: a {phase} step found no searched plan (a step cache served the search "
                    "step, the run started past it, a layer first ran late, or the geometry changed); "
                    "searching at that step",
                )
                phase = "search_refresh" if corrected else "fused_search"
            if phase in ("fused_search", "search_refresh"):
                return self._fused_search(q, k, call, refresh=phase == "search_refresh")
            if phase == "cached_search":
                lse = self.cache.get(entry, "lse", q.device)
                if lse is not None:
                    plan = self._search(q, k, lse.float(), call)
                    call.label = "cached_search"
                    return call.run_sparse(plan)
            if "lse" in entry.state and not self._searches_after(call):
                self.cache.release(entry, "lse")
            plan = entry.plan
        else:
            plan = self._current_plan(q, k, call)
            if plan is None:
                call.label = "full_plan"
                return call.run_dense()
        if corrected:
            return self.correction.attend(self, plan, call, refresh=phase == "refresh")
        call.label = "sparse"
        return call.run_sparse(plan)

    def _loaded_plan(self, call: AttentionCall, device) -> BlockPlan | None:
        """The plan of a loaded pattern set for this call (searches are skipped), or None."""
        if self.loaded is None:
            return None
        plan = self.loaded.plan_for(call.context, call.layer, call.step, call.entry.key, device)
        if plan is None:
            _log_once(
                logging.WARNING,
                f"{self.name}: {self.loaded.path} has no plan for {call.layer} ({call.context}); that layer "
                "builds or searches its own",
            )
        return plan

    def _search(self, q, k, lse, call: AttentionCall) -> BlockPlan:
        plan, info = self.pattern.search(q, k, lse, call)
        self._set_plan(call, plan)
        call.entry.state["search"] = info
        self.cache.note_peak()
        return plan

    def _fused_search(self, q, k, call: AttentionCall, refresh: bool) -> torch.Tensor:
        entry = call.entry
        out, lse = call.run_dense(return_lse=True)
        plan = self._search(q, k, lse, call)
        if "lse" in entry.state:
            self.cache.release(entry, "lse")
        if refresh:
            call.label = "search_refresh"
            self.correction.refresh_from_dense(self, plan, out, lse, call)
            return out
        if self._searches_after(call):
            self._keep_lse(call, lse)
        call.label = "fused_search"
        return out

    def _keep_lse(self, call: AttentionCall, lse: torch.Tensor) -> None:
        n = lse.numel()
        contexts = 2 if call.info.cfg == "separate" else 1
        placement = self.cache.place(
            call.entry,
            "lse",
            {torch.float32: 4 * n, torch.float16: 2 * n},
            call.num_layers * contexts,
            lse.device,
        )
        if placement is not None:
            self.cache.store(call.entry, "lse", lse.to(placement.dtype), placement)

    # --- memory ------------------------------------------------------------------------------------
    def memory(self) -> dict:
        return self.cache.report()
