"""The step schedule shared by every method: which phase each denoising step runs.

A schedule knows the run's step count, the dense warm-up, whether the method's pattern is searched (from
attention mass) and whether its output is corrected (re-ttention). Per step it returns one phase:

- ``dense``: the stock attention op;
- ``fused_search`` (searched patterns): a dense pass that also returns the LSE, then block mass -> plan;
- ``cached_search`` (searched, uncorrected): block mass of the current q, k under the LSE cached at the fused
  search -> a new plan, run sparse at once;
- ``refresh`` (corrected): a dense pass that also computes the correction statistics of the current plan;
- ``search_refresh`` (searched and corrected): a fused search, then the correction statistics of the new plan;
- ``sparse``: the current plan (corrected with the cached statistics when the method corrects).

Warm-up: ``warmup`` is a step count (int) or a fraction of the run (float, rounded half up); methods that
take the config's ``dense_steps`` resolve it to a count first (that field rounds a fraction down).
With warm-up count w and n steps:

- uncorrected static patterns: steps < w dense, the rest sparse;
- searched or corrected patterns need a first full pass: when w >= n - 1 every step is dense (a pass on the
  last step would serve no later step), else step w is the first ``fused_search`` / ``refresh`` /
  ``search_refresh``;
- cached searches (``search_at``: step indices or fractions, rounded half up) strictly after w and before n.
  Without a correction they are ``cached_search`` steps. With one, each moves to the first refresh step at or
  after it and turns that refresh into a ``search_refresh`` (a new plan invalidates the cached statistics,
  so both are renewed together from the refresh's fresh LSE);
- refresh steps (corrected): w, w + p, w + 2p, ... < n for the refresh period p; or, with ``refresh_at``
  (step indices or fractions of the run, rounded half up), w and each of those strictly after w and before n.
  Fractions keep a schedule's shape at any step count: ``refresh_at=(0.2, 0.4)`` after a 10% warm-up
  refreshes at 5, 10 and 20 of 50 steps and at 3, 6 and 12 of 30;
- ``dense_last_steps``: the last this-many steps run dense (for every method).

50 steps, adaspa defaults (warm-up 0.2, search at 0.6): 0-9 dense, 10 fused search, 11-29 sparse, 30 cached
search, 31-49 sparse. Re-ttention on a static pattern, warm-up 15, period 5: 0-14 dense, refresh at 15, 20,
..., 45, sparse (corrected) in between.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["PHASES", "Phase", "Schedule", "step_index"]

Phase = Literal["dense", "fused_search", "cached_search", "refresh", "search_refresh", "sparse"]
PHASES: tuple[str, ...] = ("dense", "fused_search", "cached_search", "refresh", "search_refresh", "sparse")


def step_index(value, num_steps: int, name: str) -> int:
    """A step as an index (int >= 0) or a fraction of ``num_steps`` (float in [0, 1], rounded half up)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be an int (step index) or a float fraction, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        return value
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} as a fraction must lie in [0, 1], got {value}")
    return math.floor(value * num_steps + 0.5)


@dataclass(frozen=True)
class Schedule:
    """Which phase each step runs (module docstring). Frozen: the derived steps and phases are computed once.

    Attributes:
        num_steps: denoising steps in the run (>= 1).
        warmup: dense warm-up: a fraction of num_steps (float, rounded half up) or a number of steps (int).
        search_at: cached-search steps (fractions or indices); only used with ``searched``.
        searched: the pattern is searched from attention mass (a fused search after the warm-up).
        refresh_every: the refresh period of a corrected method (None: not corrected, unless
            ``refresh_at`` is given).
        refresh_at: the refresh steps after the first pass (indices or fractions), instead of a period.
        dense_last_steps: the last this-many steps run dense.
    """

    num_steps: int
    warmup: float | int = 0
    search_at: tuple[float | int, ...] = ()
    searched: bool = False
    refresh_every: int | None = None
    dense_last_steps: int = 0
    refresh_at: tuple[float | int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        if isinstance(self.search_at, (int, float)):
            object.__setattr__(self, "search_at", (self.search_at,))
        object.__setattr__(self, "search_at", tuple(self.search_at))
        step_index(self.warmup, self.num_steps, "warmup")
        for v in self.search_at:
            step_index(v, self.num_steps, "search_at")
        p = self.refresh_every
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"refresh_every must be an int >= 1, got {p!r}")
        if self.refresh_at is not None:
            if p is not None:
                raise ValueError("give refresh_every or refresh_at, not both")
            at = self.refresh_at
            if isinstance(at, (int, float)):
                at = (at,)
            if not isinstance(at, (tuple, list)):
                raise ValueError(f"refresh_at must be a tuple of step indices or fractions, got {at!r}")
            object.__setattr__(self, "refresh_at", tuple(at))
            for v in self.refresh_at:
                step_index(v, self.num_steps, "refresh_at")
        d = self.dense_last_steps
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"dense_last_steps must be an int >= 0, got {d!r}")

    @property
    def corrected(self) -> bool:
        return self.refresh_every is not None or self.refresh_at is not None

    @property
    def needs_first_pass(self) -> bool:
        return self.searched or self.corrected

    @functools.cached_property
    def warmup_steps(self) -> int:
        """Number of leading dense steps (all of them when a needed first pass would come too late)."""
        w = min(step_index(self.warmup, self.num_steps, "warmup"), self.num_steps)
        if self.needs_first_pass and w >= self.num_steps - 1:
            return self.num_steps
        return w

    @functools.cached_property
    def fused_step(self) -> int | None:
        """The first full pass (fused search or first refresh), or None when every step is dense or the
        method needs none."""
        w = self.warmup_steps
        return w if self.needs_first_pass and w < self.num_steps else None

    def _steps_after(self, first: int, values, name: str) -> tuple[int, ...]:
        """``values`` (indices or fractions) as sorted steps strictly after ``first``, within the run."""
        steps = {step_index(v, self.num_steps, name) for v in values}
        return tuple(sorted(t for t in steps if first < t < self.num_steps))

    @functools.cached_property
    def cached_steps(self) -> tuple[int, ...]:
        """Sorted cached-search steps strictly after the first pass, within the run (searched only)."""
        f = self.fused_step
        if f is None or not self.searched:
            return ()
        return self._steps_after(f, self.search_at, "search_at")

    @functools.cached_property
    def refresh_steps(self) -> tuple[int, ...]:
        """Steps that renew the correction (corrected only): the first pass and every period after it."""
        f = self.fused_step
        if f is None or not self.corrected:
            return ()
        if self.refresh_at is None:
            return tuple(range(f, self.num_steps, self.refresh_every))
        return (f, *self._steps_after(f, self.refresh_at, "refresh_at"))

    @functools.cached_property
    def search_steps(self) -> tuple[int, ...]:
        """Steps that search a new plan: the fused search, then the cached ones (moved to refreshes when
        corrected)."""
        f = self.fused_step
        if f is None or not self.searched:
            return ()
        if not self.corrected:
            return (f, *self.cached_steps)
        refreshes = self.refresh_steps
        moved = {next((r for r in refreshes if r >= t), None) for t in self.cached_steps}
        return tuple(sorted({f} | (moved - {None})))

    def phase(self, step: int) -> Phase:
        """The phase of step ``step`` (0-based)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} is outside [0, {self.num_steps})")
        return self._phases[step]

    @functools.cached_property
    def _phases(self) -> tuple[Phase, ...]:
        # Asked once per attention call: computed once per schedule (the fields are frozen).
        return tuple(self._phase(t) for t in range(self.num_steps))

    def _phase(self, step: int) -> Phase:
        if step >= self.num_steps - self.dense_last_steps:
            return "dense"
        if step < self.warmup_steps:
            return "dense"
        if not self.needs_first_pass:
            return "sparse"
        search = step in self.search_steps
        if self.corrected and step in self.refresh_steps:
            return "search_refresh" if search else "refresh"
        if search:
            return "fused_search" if step == self.fused_step else "cached_search"
        return "sparse"

    def phases(self) -> tuple[Phase, ...]:
        """The phase of every step, in order."""
        return self._phases

    def last_refresh(self, step: int) -> int | None:
        """The latest refresh step at or before ``step`` (corrected schedules), or None."""
        done = [r for r in self.refresh_steps if r <= step]
        return done[-1] if done else None
