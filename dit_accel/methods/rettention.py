"""Re-ttention: a very sparse pattern whose output is corrected with softmax statistics cached at periodic
full-attention steps.

Paper: "Re-ttention: Ultra Sparse Visual Generation via Attention Statistical Reshape" (Chen et al., 2025).
Per query row i with the base pattern's key set S_i, scores s_ij and full log-sum-exp LSE_i:

- at a refresh step (a full pass): rho_i = exp(LSE_i^S - LSE_i), the in-mask share of the softmax mass,
  and R_i = O_i - rho_i * O_i^S, exactly the out-of-mask contribution. The step's output is the dense O_i.
  ``dit_accel.kernels.refresh_attention`` computes O, rho and R in one pass over the keys (two softmax
  states over the same key tiles); ``refresh="split"`` runs a dense pass and then the plan's pass, whose
  epilogue writes rho and R (``dit_accel.kernels.mask_statistics``).
- at the j-th sparse step after it: O_i = rho~_i * O_i^S + R_i with rho~_i = rho_i + ramp * (j - 1), applied
  in the sparse kernel's epilogue. With ``clamp`` (the default) rho~ is capped at 1: rho is a share of the
  mass, and past 1 the sparse part would outweigh the whole row's (the reference code does not cap; the
  quality table in docs/quality_tiny.md measures both).

Any base pattern works (``base="window"`` | ``"radial"`` | ``"adaspa"``); the window defaults to the paper's
video pattern on video families (the in-frame window repeated in every frame, ``per_frame``). Schedule
(:mod:`dit_accel.methods.schedule`): dense warm-up, then a refresh every ``refresh_every`` steps (or at the
steps ``refresh_at`` names, fractions of the run or indices); with the
adaspa base each search happens at a refresh (a new plan needs new statistics). Defaults: the paper's
schedules where it gives one (PixArt 20 steps: dense 0-4, refresh at 5, 10, 15; CogVideoX: dense 0-14 of 50,
refresh every 5: ``Family.defaults["rettention"]``), elsewhere warm-up 25% and refresh every 5 steps,
untuned.

Memory: R is output-sized per corrected layer and CFG context (Wan-14B 720p with CFG: 40 layers x 2 x 75,600
x 5,120 values = 62 GB in bf16). It goes through the method's state ledger: stored in the activation dtype
while the run's predicted total fits the budget (``max_state_bytes``, by default what the GPU has free at the
start of the run less 10% headroom), else float8 with a per-row scale (half the bytes), else in pinned host
memory copied back one layer ahead of use, else not kept (that layer then runs its base pattern
uncorrected; logged and counted in the stats). ``corrected_layers`` limits the correction to some layers.
The first call of a run logs what will be kept where, before any step is spent.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..kernels import BlockPlan
from .adaspa import SearchedPattern
from .base import AttentionCall
from .composed import ComposedMethod, family_default
from .radial import RadialPattern
from .schedule import Schedule
from .window import WindowPattern

__all__ = ["BASES", "Correction", "RettentionMethod"]

logger = logging.getLogger("dit_accel")

DEFAULT_REFRESH_EVERY = 5
DEFAULT_RAMP = 0.04
STATE_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": torch.float8_e4m3fn,
}
REFRESH_PATHS = ("auto", "fused", "split")
# "auto" on a GPU: the two-pass refresh (a dense pass with its LSE, then kernels.mask_statistics over the
# plan's blocks) below this plan density, the one-pass refresh kernel above it. Measured on an H100
# (benchmarks/results/ab_refresh_paths_nvidia_h100_80gb_hbm3.json), Wan-1.3B 480p, per-frame window: two-pass
# 12.5 / 15.6 / 17.6 ms of GPU at plan densities 0.08 / 0.33 / 0.49, one-pass 18.1-18.3 ms at any density, so
# they cross near 0.5 there. The one-pass kernel ran 1.40x a cuDNN attention on an H200 against 1.63x on the
# H100, which puts the H200 crossover near 0.35; 0.4 sits between the two. At small calls (the embedded
# model's 2,496 tokens with 16-token blocks) the two-pass path took 0.19x the one-pass kernel's GPU time and
# 0.30x its wall time per call issued back to back; whole clips there are host-bound and did not change.
AUTO_SPLIT_BELOW = 0.4
# Base pattern -> the knobs it takes (RettentionMethod's arguments passed on to it).
BASES = {
    "window": ("density", "per_frame"),
    "radial": ("decay", "window", "sink_frame"),
    "adaspa": ("sparsity", "tau", "head_adaptive", "search_at"),
}


@functools.cache
def _log_once(level: int, msg: str) -> None:
    logger.log(level, msg)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class Correction:
    """Re-ttention's correction: refresh the statistics, correct the sparse steps (module docstring).

    Args:
        refresh_every: refresh period in steps (None: the family default, else 5).
        refresh_at: refresh steps after the first one (at the end of the warm-up), as fractions of the run
            (floats in [0, 1], rounded half up) or step indices (ints), instead of a period: fractions keep
            the schedule's shape at any step count, and refreshes can come closer together early in the
            run, where attention changes fastest. Not with ``refresh_every``.
        ramp: lambda, added to rho after each sparse step.
        clamp: cap rho~ at 1.
        corrected_layers: indices of the replaced layers that get a correction (negative counts from the
            end); None: every sparse layer. The others run their base pattern uncorrected.
        state_dtype: storage of R: "auto" (the activation dtype, then float8 when the budget needs it),
            "fp32", "bf16", "fp16" or "fp8".
        refresh: "fused" (one pass, the refresh kernel), "split" (a dense pass, then a pass over the plan's
            blocks that writes the statistics: ``kernels.mask_statistics``) or "auto" (the default: on a GPU
            "split" for plans sparser than ``AUTO_SPLIT_BELOW``, which measured faster there, else "fused";
            on the CPU "fused").
    """

    name = "rettention"

    def __init__(
        self,
        refresh_every: int | None = None,
        ramp: float = DEFAULT_RAMP,
        clamp: bool = True,
        corrected_layers: tuple[int, ...] | None = None,
        state_dtype: str = "auto",
        refresh: str = "auto",
        refresh_at: tuple[float | int, ...] | float | int | None = None,
    ):
        if refresh_at is not None:
            if refresh_every is not None:
                raise ValueError(
                    f"rettention takes refresh_every={refresh_every!r} or refresh_at={refresh_at!r}, not both"
                )
            refresh_at = Schedule(1, refresh_at=refresh_at).refresh_at  # checked, as a tuple
        if refresh_every is not None and (
            isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1
        ):
            raise ValueError(f"rettention refresh_every must be an int >= 1, got {refresh_every!r}")
        if isinstance(ramp, bool) or not isinstance(ramp, (int, float)) or not 0.0 <= ramp < 1.0:
            raise ValueError(f"rettention ramp must be a number in [0, 1), got {ramp!r}")
        if not isinstance(clamp, bool):
            raise ValueError(f"rettention clamp must be a bool, got {clamp!r}")
        if corrected_layers is not None:
            if isinstance(corrected_layers, int):
                corrected_layers = (corrected_layers,)
            corrected_layers = tuple(corrected_layers)
            if any(isinstance(i, bool) or not isinstance(i, int) for i in corrected_layers):
                raise ValueError(f"rettention corrected_layers must be ints, got {corrected_layers!r}")
        if state_dtype != "auto" and state_dtype not in STATE_DTYPES:
            raise ValueError(
                f"rettention state_dtype must be 'auto' or one of {sorted(STATE_DTYPES)}, got {state_dtype!r}"
            )
        if refresh not in REFRESH_PATHS:
            raise ValueError(f"rettention refresh must be one of {REFRESH_PATHS}, got {refresh!r}")
        self._requested_period = refresh_every
        self.refresh_at = refresh_at
        if refresh_at is not None:
            self.refresh_every = None
        else:
            self.refresh_every = DEFAULT_REFRESH_EVERY if refresh_every is None else refresh_every
        self.ramp = float(ramp)
        self.clamp = clamp
        self.corrected_layers = corrected_layers
        self.state_dtype = state_dtype
        self.refresh = refresh
        self._preflight_run: int | None = None
        # (context, layer, device) -> [one-element fp32 tensor, the value last written to it]: the ramp's
        # offset as the kernel reads it under cuda_graphs=True (see _device_offset).
        self._offsets: dict = {}
        self._counts: dict = {}  # _corrected_count's answers

    def knobs(self) -> dict:
        return {
            "refresh_every": self.refresh_every,
            "refresh_at": self.refresh_at,
            "ramp": self.ramp,
            "clamp": self.clamp,
            "corrected_layers": self.corrected_layers,
            "state_dtype": self.state_dtype,
            "refresh": self.refresh,
        }

    def configure(self, families: tuple, defaults: list) -> None:
        if self._requested_period is None and self.refresh_at is None:
            period = family_default(families, "rettention", "refresh_every")
            self.refresh_every = DEFAULT_REFRESH_EVERY if period is None else period

    # --- which layers, which dtypes, how many bytes ---------------------------------------------------
    def covers(self, call: AttentionCall) -> bool:
        if self.corrected_layers is None:
            return True
        n = call.num_layers
        return any(i == call.layer_index or i + n == call.layer_index for i in self.corrected_layers)

    def _corrected_count(self, call: AttentionCall) -> int:
        """Layer-contexts of the run holding a correction (asked at every refresh: counted once per shape)."""
        n = call.num_layers
        key = (n, call.info.cfg, call.config.dense_layers, self.corrected_layers)
        count = self._counts.get(key)
        if count is None:
            layers = [
                i
                for i in range(n)
                if not call.config.is_dense_layer(i, n)
                and (
                    self.corrected_layers is None or any(j == i or j + n == i for j in self.corrected_layers)
                )
            ]
            contexts = 2 if call.info.cfg == "separate" else 1
            count = self._counts[key] = max(len(layers), 1) * contexts
        return count

    def _dtypes(self, dtype: torch.dtype) -> list[torch.dtype]:
        if self.state_dtype != "auto":
            return [STATE_DTYPES[self.state_dtype]]
        first = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        out = [first]
        if first == torch.float32:
            out.append(torch.bfloat16)
        return [*out, torch.float8_e4m3fn]

    def _sizes(self, call: AttentionCall, dtype: torch.dtype) -> dict[torch.dtype, int]:
        rows = call.batch * call.heads * call.q_len
        sizes = {}
        for d in self._dtypes(dtype):
            extra = 4 if d == torch.float8_e4m3fn else 0
            sizes[d] = rows * call.head_dim * d.itemsize + rows * (4 + extra)
        return sizes

    def preflight(self, method: ComposedMethod, call: AttentionCall) -> None:
        """Once per run, at its first corrected layer's first call: log where the run's correction state
        will live (before the warm-up is spent)."""
        if self._preflight_run == call.info.run:
            return
        self._preflight_run = call.info.run
        device = call.device
        sizes = self._sizes(call, call.dtype)
        count = self._corrected_count(call)
        first, last = next(iter(sizes)), list(sizes)[-1]
        need, least = sizes[first] * count, sizes[last] * count
        budget = method.cache.budget(device)
        where = f"{count} layer-contexts of {call.batch}x{call.heads}x{call.q_len}x{call.head_dim}"
        if budget is None or need <= budget:
            _log_once(logging.INFO, f"rettention: correction state {_gib(need)} ({first}) for {where}")
            return
        if least <= budget:
            plan = f"stored as {last} ({_gib(least)}) where {first} does not fit"
        elif method.cache.offload and device.type == "cuda":
            plan = f"{_gib(least - budget)} of it kept in host memory and copied back ahead of use"
        else:
            plan = "the layers past the budget run uncorrected"
        _log_once(
            logging.WARNING,
            f"rettention: the correction state for {where} needs {_gib(need)} in {first}, over the state "
            f"budget of {_gib(budget)} (max_state_bytes); {plan}. Options: corrected_layers=(...) for fewer "
            f"layers, state_dtype='fp8', or a larger max_state_bytes.",
        )

    # --- refresh and corrected steps -------------------------------------------------------------------
    def _place(self, method: ComposedMethod, call: AttentionCall, dtype: torch.dtype, device):
        """Where this refresh's statistics go (None: dropped). The ones held are released first, except
        under ``cuda_graphs=True``, where the new ones are written into them (:meth:`_store`)."""
        entry = call.entry
        entry.marks["refreshed_at"] = call.step
        placement = method.cache.place(
            entry, "correction", self._sizes(call, dtype), self._corrected_count(call), device
        )
        if placement is None or not call.config.cuda_graphs:
            method.cache.release(entry, "correction")
        return placement

    def _store(self, method: ComposedMethod, plan: BlockPlan, corr, call: AttentionCall, placement) -> None:
        """Keep a refresh's statistics. Under ``cuda_graphs=True`` they are written into the ones held when
        those have the same layout: the held tensors keep their identity, so the corrected forwards captured
        before this refresh replay after it, reading the new statistics (docs/graphs.md). Eager runs release
        the old statistics before computing the new ones, so they never hold both."""
        method.cache.store(call.entry, "correction", corr, placement, in_place=call.config.cuda_graphs)
        call.entry.marks["corrected_plan"] = id(plan)

    def _refresh(self, method: ComposedMethod, plan: BlockPlan, call: AttentionCall):
        placement = self._place(method, call, call.dtype, call.device)
        call.label = "refresh"
        if placement is None:
            return call.run_dense()
        if self._refresh_path(plan, call) == "split":
            out, lse = call.run_dense(return_lse=True)
            self._store_from_dense(method, plan, out, lse, call, placement)
            return out
        out, _, corr = call.run_refresh(plan, residual_dtype=placement.dtype)
        self._store(method, plan, corr, call, placement)
        return out

    def _refresh_path(self, plan: BlockPlan, call: AttentionCall) -> str:
        if self.refresh != "auto":
            return self.refresh
        if call.device.type != "cuda":
            return "fused"
        density = call.entry.density if call.entry.plan is plan and call.entry.density is not None else None
        return "split" if (density if density is not None else plan.density()) < AUTO_SPLIT_BELOW else "fused"

    def _store_from_dense(self, method, plan, out, lse, call: AttentionCall, placement) -> None:
        corr = call.run_statistics(plan, out, lse, residual_dtype=placement.dtype)
        self._store(method, plan, corr, call, placement)

    def refresh_from_dense(self, method, plan: BlockPlan, out, lse, call: AttentionCall) -> None:
        """After a fused search (``out``, ``lse`` from its dense pass): the statistics of the new plan."""
        placement = self._place(method, call, out.dtype, out.device)
        if placement is not None:
            self._store_from_dense(method, plan, out, lse, call, placement)

    def attend(self, method: ComposedMethod, plan: BlockPlan, call: AttentionCall, refresh: bool):
        """A refresh step's dense output (statistics renewed), or a corrected sparse step."""
        entry = call.entry
        if refresh:
            return self._refresh(method, plan, call)
        corr = method.cache.get(entry, "correction", call.device)
        if method.cache.offloaded:  # only then is a later layer's correction in host memory
            following = method.cache.next_host_entry(entry, "correction")
            if following is not None:
                method.cache.prefetch(following, "correction", call.device)
        if corr is not None and entry.marks.get("corrected_plan") != id(plan):
            corr = None  # statistics of another plan: renew them
            entry.marks.pop("refreshed_at", None)
        if corr is None:
            if "refreshed_at" in entry.marks:
                call.label = "sparse"  # the state budget dropped this layer's correction
                return call.run_sparse(plan)
            _log_once(
                logging.WARNING,
                "rettention: a sparse step found no correction (a step cache served the refresh step, the "
                "run started past it, a layer first ran late, or the plan changed); refreshing at that step",
            )
            return self._refresh(method, plan, call)
        offset = self.offset(call.step, entry)
        if call.config.cuda_graphs and self.ramp:
            offset = self._device_offset(call, offset)
        call.label = "corrected"
        return call.run_sparse(plan, correction=corr, rho_offset=offset, clamp_rho=self.clamp)

    def offset(self, step: int, entry) -> float:
        """The ramp's addition to rho at ``step`` for a layer refreshed at ``entry.marks["refreshed_at"]``."""
        return self.ramp * max(step - entry.marks["refreshed_at"] - 1, 0)

    def _device_offset(self, call: AttentionCall, value: float) -> torch.Tensor:
        """The offset in a tensor of this (context, layer) that the kernel reads on the device. A CUDA graph
        captures the read, not the value: :meth:`prepare_replay` writes each step's value before a captured
        forward is captured or replayed, and an eager forward writes it here. Written only when it changes,
        so a forward being captured (whose values were written just before) records no write."""
        key = (call.context, call.layer, call.device)
        slot = self._offsets.get(key)
        if slot is None:
            if call.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("rettention: a corrected layer first ran inside a CUDA graph capture")
            slot = self._offsets[key] = [
                torch.full((1,), value, dtype=torch.float32, device=call.device),
                value,
            ]
        else:
            _write(slot, value)
        return slot[0]

    def prepare_replay(self, method: ComposedMethod, context: str, step: int) -> None:
        """Before a captured forward of ``context`` runs at ``step``: write each corrected layer's offset."""
        if not self.ramp:
            return
        entries = method.cache.entries()
        for (ctx, layer, _), slot in self._offsets.items():
            entry = entries.get((ctx, layer))
            if ctx != context or entry is None or "refreshed_at" not in entry.marks:
                continue
            _write(slot, self.offset(step, entry))


def _write(slot: list, value: float) -> None:
    """Fill an offset slot's tensor with ``value`` unless it already holds it."""
    if slot[1] != value:
        slot[0].fill_(value)
        slot[1] = value


class RettentionMethod(ComposedMethod):
    """Re-ttention on a window, radial or adaspa base (module docstring).

    Args:
        base: "window" (default), "radial" or "adaspa".
        refresh_every, refresh_at, ramp, clamp, corrected_layers, state_dtype, refresh: the correction
            (:class:`Correction`).
        density, per_frame: the window base's knobs (density default 0.1; per_frame default: on for video
            families).
        decay, window, sink_frame: the radial base's knobs (defaults: the family's radial defaults).
        sparsity, tau, head_adaptive, search_at: the adaspa base's knobs (sparsity default 0.9; search_at
            default (0.6,); each search moves to the next refresh step).

    A knob of another base than the chosen one is an error naming the base's knobs. Dense warm-up:
    ``dense_steps`` (config), else the family's ``Family.defaults["rettention"]``, else 25% of the steps.
    """

    name = "rettention"
    default_warmup = 0.25

    def __init__(
        self,
        base: str = "window",
        refresh_every: int | None = None,
        ramp: float = DEFAULT_RAMP,
        clamp: bool = True,
        corrected_layers: tuple[int, ...] | None = None,
        state_dtype: str = "auto",
        refresh: str = "auto",
        density: float | None = None,
        per_frame: bool | None = None,
        decay: float | None = None,
        window: str | None = None,
        sink_frame: bool | None = None,
        sparsity: float | None = None,
        tau: float | None = None,
        head_adaptive: bool | None = None,
        search_at: tuple[float | int, ...] | float | int | None = None,
        refresh_at: tuple[float | int, ...] | float | int | None = None,
    ):
        if base not in BASES:
            raise ValueError(f"rettention base must be one of {sorted(BASES)}, got {base!r}")
        given = {
            k: v
            for k, v in dict(
                density=density,
                per_frame=per_frame,
                decay=decay,
                window=window,
                sink_frame=sink_frame,
                sparsity=sparsity,
                tau=tau,
                head_adaptive=head_adaptive,
                search_at=search_at,
            ).items()
            if v is not None
        }
        foreign = sorted(set(given) - set(BASES[base]))
        if foreign:
            raise ValueError(
                f"rettention base {base!r} takes {list(BASES[base])}, not {foreign} (those belong to "
                + ", ".join(f"{b!r}" for b in BASES if set(foreign) & set(BASES[b]))
                + ")"
            )
        self.base = base
        self._per_frame_requested = per_frame
        if base == "window":
            pattern = WindowPattern(0.1 if density is None else density, bool(per_frame))
        elif base == "radial":
            pattern = RadialPattern(decay, window or "raster", sink_frame)
        else:
            if sparsity is None and tau is None:
                sparsity = 0.9
            pattern = SearchedPattern(sparsity, tau, head_adaptive)
        search = (0.6,) if search_at is None else search_at
        super().__init__(
            pattern,
            Correction(refresh_every, ramp, clamp, corrected_layers, state_dtype, refresh, refresh_at),
            search_at=search if base == "adaspa" else (),
        )

    def configure(self, config, families: tuple):
        if self.base == "window" and self._per_frame_requested is None:
            self.pattern.per_frame = all(f.video for f in families)
        if self.base == "radial" and config.block_q is not None and config.block_q != config.block_k:
            raise ValueError(
                f"radial plans use one block size for queries and keys; got block_q={config.block_q}, "
                f"block_k={config.block_k}"
            )
        return super().configure(config, families)
