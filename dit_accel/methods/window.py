"""The window pattern: a band of key blocks around each query block, plus all text.

Band (``per_frame=False``, the default): query block p (tokens [p*block_q, (p+1)*block_q)) keeps the key
blocks c with |c - c_p| <= w, where c_p is the key block holding the query block's centre and
w = round((density * n_kblocks - 1) / 2), at least 0. The band ignores the latent grid.

Per frame (``per_frame=True``, re-ttention's video pattern: "the same in-frame window repeated in every
frame"): with a latent grid of T frames of s tokens, the query block's centre token sits at in-frame
position pos; in every frame j the window keeps n_f = max(1, round(density * s / block_k)) consecutive key
blocks centred on the block that holds token j*s + pos, clipped to frame j's blocks. A call without a grid,
or whose sequence is not the grid's tokens plus the text, falls back to the band (logged once).

Block size: with the automatic blocks (``block_q=None``) the per-frame window caps them at the largest power
of two (at least 16) that fits 8 times in a frame (:data:`BLOCKS_PER_FRAME`), so a one-block window stays a
small part of its frame: 16 tokens on the embedded model's 192-token frames, where the automatic 128 would
cover two thirds of a frame; the automatic 128 at Wan's and HunyuanVideo's real sizes (1,560-3,600-token
frames). The band has no frames and keeps the automatic blocks.

Every query keeps all text key blocks and text query blocks keep every key block (DESIGN.md §4). At
density >= 1 the plan is full. Windows are whole blocks: where that makes the kept share of the keys differ
from ``density`` by more than 1.5x either way (short sequences, large blocks), a warning says so once.
"""

from __future__ import annotations

import functools
import logging

import torch

from ..kernels import BlockPlan
from ..kernels.plan import num_blocks
from .base import AttentionCall
from .composed import ComposedMethod, Pattern

__all__ = ["WindowMethod", "WindowPattern", "frame_window_block_mask", "window_block_mask"]

logger = logging.getLogger("dit_accel")


@functools.cache
def _log_once(msg: str) -> None:
    logger.warning(msg)


# The per-frame window's automatic blocks fit at least this many times in a frame (module docstring).
BLOCKS_PER_FRAME = 8


def _band_halfwidth(density: float, n_kblocks: int) -> int:
    return max(0, round((density * n_kblocks - 1) / 2))


def _frame_blocks(density: float, frame_tokens: int, block_k: int) -> int:
    return max(1, round(density * frame_tokens / block_k))


def _add_text(mask, q_len, k_len, block_q, block_k, text_len, text_position):
    if text_len > 0 and text_position == "first":
        mask[:, : num_blocks(text_len, block_k)] = True
        mask[: num_blocks(text_len, block_q)] = True
    elif text_len > 0 and text_position == "last":
        mask[:, (k_len - text_len) // block_k :] = True
        mask[(q_len - text_len) // block_q :] = True
    return mask


def window_block_mask(
    q_len: int,
    k_len: int,
    block_q: int,
    block_k: int,
    density: float,
    text_len: int = 0,
    text_position: str | None = None,
    device=None,
) -> torch.Tensor:
    """Boolean block mask [n_qblocks, n_kblocks] of the band (see the module docstring)."""
    n_qb, n_kb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    if density >= 1.0:
        return torch.ones(n_qb, n_kb, dtype=torch.bool, device=device)
    w = _band_halfwidth(density, n_kb)
    centre = ((torch.arange(n_qb, device=device) * block_q + block_q // 2) // block_k).clamp(max=n_kb - 1)
    cols = torch.arange(n_kb, device=device)
    mask = (cols[None, :] - centre[:, None]).abs() <= w
    return _add_text(mask, q_len, k_len, block_q, block_k, text_len, text_position)


def frame_window_block_mask(
    grid: tuple[int, int, int],
    block_q: int,
    block_k: int,
    density: float,
    text_len: int = 0,
    text_position: str | None = None,
    device=None,
) -> torch.Tensor:
    """Boolean block mask [n_qblocks, n_kblocks] of the per-frame window (module docstring) over the
    frame-major sequence of ``grid`` (T, H, W) plus ``text_len`` text tokens first or last."""
    frames, height, width = grid
    s = height * width
    n_video = frames * s
    seq = n_video + text_len
    start = text_len if text_position == "first" else 0
    n_qb, n_kb = num_blocks(seq, block_q), num_blocks(seq, block_k)
    if density >= 1.0:
        return torch.ones(n_qb, n_kb, dtype=torch.bool, device=device)
    n_f = _frame_blocks(density, s, block_k)
    centre = (torch.arange(n_qb) * block_q + block_q // 2).clamp(start, start + n_video - 1)
    pos = (centre - start) % s  # [n_qb] in-frame position of each query block's centre
    cols = torch.arange(n_kb)
    mask = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    for j in range(frames):
        first = (start + j * s) // block_k
        last = (start + (j + 1) * s - 1) // block_k
        c = (start + j * s + pos) // block_k
        lo = (c - (n_f - 1) // 2).clamp(first, last)
        hi = (lo + n_f - 1).clamp(max=last)
        lo = (hi - n_f + 1).clamp(min=first)
        mask |= (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])
    mask = _add_text(mask, seq, seq, block_q, block_k, text_len, text_position)
    return mask.to(device) if device is not None else mask


class WindowPattern(Pattern):
    """The window pattern (module docstring).

    Args:
        density: fraction of key blocks each (non-text) query block keeps, in (0, 1].
        per_frame: repeat an in-frame window in every latent frame instead of one band.
    """

    name = "window"

    def __init__(self, density: float = 0.1, per_frame: bool = False):
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"window density must lie in (0, 1], got {density!r}")
        if not isinstance(per_frame, bool):
            raise ValueError(f"window per_frame must be a bool, got {per_frame!r}")
        self.density = float(density)
        self.per_frame = per_frame

    def knobs(self) -> dict:
        return {"density": self.density, "per_frame": self.per_frame}

    def max_block(self, grid, q_len: int, k_len: int, text_len: int) -> int | None:
        if not self.per_frame or grid is None or not q_len == k_len == grid[0] * grid[1] * grid[2] + text_len:
            return None
        fit = max(grid[1] * grid[2] // BLOCKS_PER_FRAME, 16)
        return 1 << (fit.bit_length() - 1)

    def build(self, call: AttentionCall) -> BlockPlan:
        bq, bk = call.block_q, call.block_k
        if self.per_frame:
            grid = call.grid
            text = call.text_len or 0
            if grid is not None and call.q_len == call.k_len == grid[0] * grid[1] * grid[2] + text:
                frame_tokens = grid[1] * grid[2]
                self._check_rounding(
                    min(1.0, _frame_blocks(self.density, frame_tokens, bk) * bk / frame_tokens), call
                )
                mask = frame_window_block_mask(grid, bq, bk, self.density, text, call.text_position)
                return BlockPlan.from_block_mask(mask[None, None], bq, bk)
            _log_once(
                f"window per_frame: {call.layer} attends {call.q_len} tokens without a matching latent grid "
                f"({call.grid}); using the band instead"
            )
        n_kb = num_blocks(call.k_len, bk)
        self._check_rounding(min(1.0, (2 * _band_halfwidth(self.density, n_kb) + 1) / n_kb), call)
        mask = window_block_mask(
            call.q_len, call.k_len, bq, bk, self.density, call.text_len, call.text_position
        )
        return BlockPlan.from_block_mask(mask[None, None], bq, bk)

    def _check_rounding(self, kept: float, call: AttentionCall) -> None:
        """Log once when whole blocks make the window keep a share of the keys far from ``density``."""
        if self.density < 1.0 and not self.density / 1.5 <= kept <= self.density * 1.5:
            _log_once(
                f"window: density {self.density:g} keeps {kept:.3f} of the key blocks at {call.k_len} tokens "
                f"with {call.block_k}-token blocks (whole blocks); smaller blocks (block_k) follow the "
                "density more closely"
            )


class WindowMethod(ComposedMethod):
    """Banded block-sparse attention at a target density (no search, no correction).

    Args:
        density: fraction of key blocks each (non-text) query block keeps, in (0, 1].
        per_frame: the per-frame window instead of the band (module docstring).
    """

    name = "window"

    def __init__(self, density: float = 0.1, per_frame: bool = False):
        super().__init__(WindowPattern(density, per_frame))

    @property
    def density(self) -> float:
        return self.pattern.density
