"""Radial attention: a static spatio-temporal block plan whose window halves with frame distance.

Provenance: the paper "Radial Attention: O(n log n) sparse attention with energy decay for long video
generation" (Li et al., 2025) and its reference implementation, mit-han-lab/radial-attention,
``radial_attn/attn_mask.py`` (``get_window_width``, ``get_diagonal_split_mask``, ``shrinkMaskStrict``,
``gen_log_mask_shrinked``). The rules below reproduce that file; the deliberate differences are listed at
the end. The plan builder (:func:`build_plan`) is pure geometry; :class:`RadialPattern` gives it the call's
geometry and :class:`RadialMethod` composes it with the shared schedule (per-family defaults in each family's
``Family.defaults["radial"]``, one plan per geometry shared by all layers and CFG contexts).

Geometry. A latent grid of T frames of H x W tokens, s = H*W tokens per frame, frame-major
(index = t*H*W + h*W + w), optionally with n_text text tokens before or after the video tokens.
S = T*s + n_text. Blocks are ``block`` tokens of the whole sequence (text included), the last one
partial when S is not a multiple of the block.

Token mask. Query frame i, key frame j, d = |i - j|; p_q, p_k are the in-frame raster positions
(h*W + w) of the query and key tokens.

- d <= 1: the whole frame pair.
- Attention sink (``sink_frame=True``): every query frame attends all of key frame 0.
- d >= 2: let L(d) = 2^bitlen(s) / 2^bitlen(d) (undecayed width; it halves at d = 2, 4, 8, ...).
  * If L(d) < block: keep the pair only when d is a multiple of block / L(d) (a power of two), so the
    average compute per frame pair keeps halving after the window has reached one block; drop it
    otherwise. A kept pair still uses the window below (it is a window AND a frame-pair switch).
  * Window half-width w(d) = max(L(d) * decay, block).
    ``window="raster"``: keep |p_q - p_k| <= w(d) (the reference's rule: a strip in raster order).
    ``window="2d"``: keep |h_q - h_k| <= r and |w_q - w_k| <= r, a square of side 2r + 1 whose area
    matches the raster strip's 2*floor(w) + 1 tokens: r is the integer for which (2r + 1)^2 is closest to
    2*floor(w) + 1 (ties to the smaller r). Both counts are for a query away from the frame border;
    both windows are clipped at the border.
- Text tokens: every query attends every text key, and text queries attend every key.

Token mask -> block mask (the reference's ``shrinkMaskStrict``), per frame pair (i, j), per block pair
(p, q): restrict the token mask to rows of frame i in query block p and columns of frame j in key block q.
For each such column c, n_c = number of set rows. With R_ip = the number of rows of frame i in block p
(the block size when the block lies inside the frame):

    column c is non-empty if n_c > 0, and dense if n_c > R_ip / 3;
    block (p, q) is kept for this pair if  #dense columns > 0.6 * #non-empty columns.

Whole frame pairs (d <= 1, the sink) are therefore always kept at block level: every block they touch has
all its columns dense. The windows are kept where the strip (or square) fills enough of a block.

Block masks of all frame pairs are OR-ed, then every block row and column that contains a text token is
set. ``reduce_token_mask`` applies this rule to an explicit token mask (small grids, tests); ``block_mask``
computes the same result without materialising the S x S mask: for each query frame and each distinct
window it computes n_c analytically for all block rows of the frame (a clipped interval length for the
raster strip, a 2-D prefix sum for the square), then gets the dense / non-empty column counts of every key
block from prefix sums over c. Cost O(T * windows * blocks_per_frame * s + T^2 * blocks_per_frame^2).

Differences from the reference, on purpose:

- Wan's d = 1 pair: the reference's ``model_type="wan"`` path uses a half-frame raster window
  (|p_q - p_k| <= s // 2) for d = 1; here d <= 1 is always the whole pair (the HunyuanVideo rule and
  DESIGN.md §4.1). At Wan 768x1280, 69 frames (18 x 48 x 80), decay 0.2, sink, block 128 this gives
  71.3% of blocks skipped; the reference's Wan rule gives 73.7%.
- The reference hard-codes 128 as the block size in the frame-pair switch (``get_diagonal_split_mask``);
  here it is ``block``. Identical at block 128.
- The reference divides n_c by the block size, not by R_ip. Identical when every block lies inside one
  frame (s and the text length multiples of the block, as at Wan 768x1280). Where a block straddles two
  frames, the reference lets a frame that owns at most a third of the block's rows keep nothing through its
  own pairs, so those queries lose part of their own and adjacent frames; with frames smaller than a third
  of a block (tiny test models: 16 frames of 2 x 2 tokens, block 64) whole block rows come out empty and
  their queries would attend nothing. Dividing by R_ip keeps every whole pair whole.
- The reference shrinks a frame pair into ceil(s / block) blocks counted from the frame's first block, so
  when a frame starts mid-block its spill into one more block is dropped for that pair; here every block a
  frame pair touches is reduced.
- The reference pads the sequence to a multiple of the block and forces the partial last block's row and
  column on; here the last block is reduced like any other (R_ip counts only real rows).
- The reference always uses the sink for Wan and never for HunyuanVideo; here it is ``sink_frame``.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import torch

from dit_accel.kernels import BlockPlan

from ..config import SparseAttentionConfig
from .base import AttentionCall
from .composed import ComposedMethod, Pattern, family_default

__all__ = [
    "RadialMethod",
    "RadialPattern",
    "build_plan",
    "block_mask",
    "token_mask",
    "reduce_token_mask",
    "token_segments",
]

logger = logging.getLogger("dit_accel")

_WINDOWS = ("raster", "2d")


@dataclass(frozen=True)
class _Geometry:
    frames: int
    height: int
    width: int
    text_tokens: int
    text_first: bool
    block: int

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def video_start(self) -> int:
        return self.text_tokens if self.text_first else 0

    @property
    def seq_len(self) -> int:
        return self.frames * self.frame_tokens + self.text_tokens

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block)

    def text_range(self) -> tuple[int, int]:
        if self.text_first:
            return 0, self.text_tokens
        video_end = self.frames * self.frame_tokens
        return video_end, video_end + self.text_tokens


def _geometry(frames, height, width, text_tokens, text_first, block, decay, window) -> _Geometry:
    for name, value in (("frames", frames), ("height", height), ("width", width), ("block", block)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if int(text_tokens) != text_tokens or text_tokens < 0:
        raise ValueError(f"text_tokens must be a non-negative integer, got {text_tokens!r}")
    if not decay > 0:
        raise ValueError(f"decay must be positive, got {decay!r}")
    if window not in _WINDOWS:
        raise ValueError(f"window must be one of {_WINDOWS}, got {window!r}")
    return _Geometry(int(frames), int(height), int(width), int(text_tokens), bool(text_first), int(block))


# A frame-pair window: ("drop",), ("whole",), ("raster", w) with |p_q - p_k| <= w, or ("box", r) with
# |dh| <= r and |dw| <= r.
_DROP = ("drop",)
_WHOLE = ("whole",)


def _square_radius(strip_tokens: int) -> int:
    """The r >= 0 whose square of side 2r + 1 has the area closest to ``strip_tokens`` (ties: smaller r)."""
    r = max((math.isqrt(strip_tokens) - 1) // 2, 0)
    if abs((2 * r + 3) ** 2 - strip_tokens) < abs((2 * r + 1) ** 2 - strip_tokens):
        r += 1
    return r


def _pair_window(d: int, frame_tokens: int, block: int, decay: float, window: str) -> tuple:
    """Window of a frame pair at frame distance ``d`` (no sink, no text): see the module docstring."""
    if d <= 1:
        return _WHOLE
    undecayed = 2.0 ** (frame_tokens.bit_length() - d.bit_length())
    if undecayed < block and d % int(block / undecayed) != 0:
        return _DROP
    half_width = math.floor(max(undecayed * decay, block))
    if window == "raster":
        return _WHOLE if half_width >= frame_tokens - 1 else ("raster", half_width)
    return ("box", _square_radius(2 * half_width + 1))


def _frame_windows(geo: _Geometry, decay: float, window: str, sink_frame: bool) -> list[list[tuple]]:
    by_distance = [_pair_window(d, geo.frame_tokens, geo.block, decay, window) for d in range(geo.frames)]
    table = [[by_distance[abs(i - j)] for j in range(geo.frames)] for i in range(geo.frames)]
    if sink_frame:
        for row in table:
            row[0] = _WHOLE
    return table


def _text_blocks(geo: _Geometry) -> tuple[int, int]:
    """Block index range [lo, hi) holding text tokens (empty if none)."""
    if geo.text_tokens == 0:
        return 0, 0
    lo, hi = geo.text_range()
    return lo // geo.block, (hi - 1) // geo.block + 1


# --------------------------------------------------------------------------------------------------
# Token-level oracle (O(S^2) memory: small grids and tests only)
# --------------------------------------------------------------------------------------------------
def token_mask(
    frames: int,
    height: int,
    width: int,
    *,
    text_tokens: int = 0,
    text_first: bool = False,
    block: int = 128,
    decay: float = 1.0,
    window: str = "raster",
    sink_frame: bool = False,
    device=None,
) -> torch.Tensor:
    """The radial element mask the block plan is reduced from (O(S^2) memory: for small grids).

    Args: as :func:`build_plan` (``block`` matters here too: it sets the minimum window and the
        frame-pair switch).

    Returns:
        bool [S, S], S = frames * height * width + text_tokens; True where query row attends key column.
    """
    geo = _geometry(frames, height, width, text_tokens, text_first, block, decay, window)
    table = _frame_windows(geo, decay, window, sink_frame)
    s, n_video = geo.frame_tokens, geo.frames * geo.frame_tokens

    kinds = {"drop": 0, "whole": 1, "raster": 2, "box": 3}
    kind = torch.tensor([[kinds[w[0]] for w in row] for row in table], dtype=torch.int64)
    bound = torch.tensor([[w[1] if len(w) > 1 else 0 for w in row] for row in table], dtype=torch.int64)

    idx = torch.arange(n_video)
    t, p = idx // s, idx % s
    h, w = p // geo.width, p % geo.width
    pair_kind = kind[t[:, None], t[None, :]]
    pair_bound = bound[t[:, None], t[None, :]]
    raster_ok = (p[:, None] - p[None, :]).abs() <= pair_bound
    box_ok = ((h[:, None] - h[None, :]).abs() <= pair_bound) & ((w[:, None] - w[None, :]).abs() <= pair_bound)
    video = (
        (pair_kind == kinds["whole"])
        | ((pair_kind == kinds["raster"]) & raster_ok)
        | ((pair_kind == kinds["box"]) & box_ok)
    )

    mask = torch.ones(geo.seq_len, geo.seq_len, dtype=torch.bool)
    v0 = geo.video_start
    mask[v0 : v0 + n_video, v0 : v0 + n_video] = video
    return mask.to(device) if device is not None else mask


def reduce_token_mask(mask: torch.Tensor, segment: torch.Tensor, block: int) -> torch.Tensor:
    """Reduce an element mask to a block mask with the reference's density rule, per segment pair.

    Args:
        mask: bool [S, S] element mask.
        segment: int [S]: the frame of each token, or -1 for a text token.
        block: block size (query and key).

    Returns:
        bool [nb, nb], nb = ceil(S / block): OR over frame pairs (a, b) of the rule applied to ``mask``
        restricted to query frame a and key frame b (a column is dense when more than a third of the
        block's real rows are set; a block is kept when more than 60% of its non-empty columns are dense),
        then every block row and column containing a text token set.
    """
    n = mask.shape[0]
    if mask.shape != (n, n) or segment.shape != (n,):
        raise ValueError(
            f"mask must be [S, S] and segment [S], got {tuple(mask.shape)}, {tuple(segment.shape)}"
        )
    nb = -(-n // block)
    pad = nb * block - n
    padded_segment = torch.nn.functional.pad(segment, (0, pad), value=-1).view(nb, block)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    frames = [int(f) for f in torch.unique(segment) if f >= 0]
    for a in frames:
        rows = (padded_segment == a).sum(1)  # [nb]: rows of query frame a in each block
        for b in frames:
            sub = mask & (segment == a)[:, None] & (segment == b)[None, :]
            sub = torch.nn.functional.pad(sub, (0, pad, 0, pad))
            counts = sub.view(nb, block, nb, block).sum(1, dtype=torch.int64)  # [nb, nb, block]
            out |= _keep_block(counts, rows[:, None, None])
    text = segment < 0
    if text.any():
        text_block = torch.nn.functional.pad(text, (0, pad)).view(nb, block).any(1)
        out[text_block, :] = True
        out[:, text_block] = True
    return out


def _keep_block(counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The density rule on per-column set-row counts [..., cols]; ``rows``: the query frame's rows."""
    return _keep(_dense_columns(counts, rows).sum(-1), (counts > 0).sum(-1))


def _dense_columns(counts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A column is dense when more than a third of the query frame's rows in the block are set."""
    return 3 * counts > rows


def _keep(n_dense: torch.Tensor, n_nonempty: torch.Tensor) -> torch.Tensor:
    """A block is kept when more than 60% of its non-empty columns are dense."""
    return 5 * n_dense > 3 * n_nonempty


# --------------------------------------------------------------------------------------------------
# Block-level builder (no S x S mask)
# --------------------------------------------------------------------------------------------------
def _column_counts(spec: tuple, geo: _Geometry, r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """n_c for each query-block segment [r0, r1) of a frame (in-frame rows) and each in-frame column c.

    Returns int64 [n_segments, s].
    """
    s = geo.frame_tokens
    c = torch.arange(s)
    if spec[0] == "whole":
        return (r1 - r0)[:, None].expand(-1, s)
    if spec[0] == "raster":
        w = spec[1]
        lo = torch.maximum(r0[:, None], c[None, :] - w)
        hi = torch.minimum(r1[:, None] - 1, c[None, :] + w)
        return (hi - lo + 1).clamp(min=0)
    r = spec[1]
    H, W = geo.height, geo.width
    inside = (c[None, :] >= r0[:, None]) & (c[None, :] < r1[:, None])  # [n, s]
    prefix = torch.zeros(r0.shape[0], H + 1, W + 1, dtype=torch.int64)
    prefix[:, 1:, 1:] = inside.view(-1, H, W).to(torch.int64).cumsum(1).cumsum(2)
    h, w = c // W, c % W
    h_lo, h_hi = (h - r).clamp(min=0), (h + r).clamp(max=H - 1) + 1
    w_lo, w_hi = (w - r).clamp(min=0), (w + r).clamp(max=W - 1) + 1
    flat = prefix.view(r0.shape[0], -1)
    at = lambda y, x: flat[:, y * (W + 1) + x]
    return at(h_hi, w_hi) - at(h_lo, w_hi) - at(h_hi, w_lo) + at(h_lo, w_lo)


def _frame_blocks(geo: _Geometry, frame: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """First block index of a frame and the in-frame [lo, hi) token range of each block it touches."""
    start = geo.video_start + frame * geo.frame_tokens
    end = start + geo.frame_tokens
    first, last = start // geo.block, (end - 1) // geo.block
    edges = torch.arange(first, last + 2) * geo.block
    lo = edges[:-1].clamp(min=start) - start
    hi = edges[1:].clamp(max=end) - start
    return first, lo, hi


def block_mask(
    frames: int,
    height: int,
    width: int,
    *,
    text_tokens: int = 0,
    text_first: bool = False,
    block: int = 128,
    decay: float = 1.0,
    window: str = "raster",
    sink_frame: bool = False,
    device=None,
) -> torch.Tensor:
    """The radial block mask, built frame pair by frame pair at block granularity.

    Args: as :func:`build_plan`.

    Returns:
        bool [nb, nb], nb = ceil(S / block); equal to
        ``reduce_token_mask(token_mask(...), segment, block)`` for the same arguments.
    """
    geo = _geometry(frames, height, width, text_tokens, text_first, block, decay, window)
    table = _frame_windows(geo, decay, window, sink_frame)
    nb = geo.num_blocks
    out = torch.zeros(nb, nb, dtype=torch.bool)
    blocks = [_frame_blocks(geo, f) for f in range(geo.frames)]

    for i in range(geo.frames):
        q_first, r0, r1 = blocks[i]
        rows = (r1 - r0)[:, None]
        cumulative = {}
        for j in range(geo.frames):
            spec = table[i][j]
            if spec == _DROP:
                continue
            if spec not in cumulative:
                counts = _column_counts(spec, geo, r0, r1)
                dense = torch.nn.functional.pad(_dense_columns(counts, rows).cumsum(1), (1, 0))
                nonempty = torch.nn.functional.pad((counts > 0).cumsum(1), (1, 0))
                cumulative[spec] = dense, nonempty
            dense, nonempty = cumulative[spec]
            k_first, c0, c1 = blocks[j]
            n_dense = dense[:, c1] - dense[:, c0]  # [query blocks, key blocks]
            n_nonempty = nonempty[:, c1] - nonempty[:, c0]
            out[q_first : q_first + r0.shape[0], k_first : k_first + c0.shape[0]] |= _keep(
                n_dense, n_nonempty
            )

    lo, hi = _text_blocks(geo)
    out[lo:hi, :] = True
    out[:, lo:hi] = True
    return out.to(device) if device is not None else out


def build_plan(
    frames: int,
    height: int,
    width: int,
    *,
    text_tokens: int = 0,
    text_first: bool = False,
    block: int = 128,
    decay: float = 1.0,
    window: str = "raster",
    sink_frame: bool = False,
    device=None,
) -> BlockPlan:
    """The radial attention block plan for one latent geometry (batch and heads of 1; broadcast by caller).

    Args:
        frames, height, width: latent grid in tokens after patchify; tokens are frame-major.
        text_tokens: text tokens in the self-attention sequence (always attended and attending).
        text_first: text before the video tokens (CogVideoX, Flux) rather than after (HunyuanVideo, Mochi).
        block: query and key block size of the plan (any positive size; the kernels use 64 or 128).
        decay: window scale for frame distances >= 2 (reference defaults: Wan 0.2, HunyuanVideo 0.95).
        window: ``"raster"`` (the reference's strip in raster order) or ``"2d"`` (a square of equal area).
        sink_frame: every query also attends all of latent frame 0.
        device: device of the plan tensors.

    Returns:
        BlockPlan with block_q = block_k = ``block`` over ceil(S / block) blocks,
        S = frames * height * width + text_tokens.
    """
    mask = block_mask(
        frames,
        height,
        width,
        text_tokens=text_tokens,
        text_first=text_first,
        block=block,
        decay=decay,
        window=window,
        sink_frame=sink_frame,
        device=device,
    )
    return BlockPlan.from_block_mask(mask[None, None], block, block)


def token_segments(
    frames: int, height: int, width: int, *, text_tokens: int = 0, text_first: bool = False
) -> torch.Tensor:
    """int64 [S]: the frame of each token, -1 for text (the ``segment`` of :func:`reduce_token_mask`)."""
    video = torch.arange(frames).repeat_interleave(height * width)
    text = torch.full((text_tokens,), -1, dtype=torch.int64)
    return torch.cat([text, video] if text_first else [video, text])


# --------------------------------------------------------------------------------------------------
# The pattern and the method
# --------------------------------------------------------------------------------------------------
@functools.cache
def _log_once(level: int, msg: str) -> None:
    logger.log(level, msg)


class RadialPattern(Pattern):
    """The radial pattern of a call's latent grid (see the module docstring); one plan per geometry.

    Args:
        decay: window scale for frame distances >= 2 (> 0); None: the model family's default
            (``Family.defaults["radial"]``, filled by :meth:`configure`).
        window: "raster" (the reference's strip, the default) or "2d" (a square of equal area; under the
            block keep rule it mostly vanishes, see docs/radial.md).
        sink_frame: every query attends all of latent frame 0; None: the family default.
    """

    name = "radial"

    def __init__(self, decay: float | None = None, window: str = "raster", sink_frame: bool | None = None):
        if decay is not None and (
            isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay > 0
        ):
            raise ValueError(f"radial decay must be a positive number, got {decay!r}")
        if window not in _WINDOWS:
            raise ValueError(f"radial window must be one of {_WINDOWS}, got {window!r}")
        if sink_frame is not None and not isinstance(sink_frame, bool):
            raise ValueError(f"radial sink_frame must be a bool, got {sink_frame!r}")
        self._requested = {"decay": decay, "sink_frame": sink_frame}
        self.decay = None if decay is None else float(decay)
        self.window = window
        self.sink_frame = sink_frame

    def knobs(self) -> dict:
        return {"decay": self.decay, "window": self.window, "sink_frame": self.sink_frame}

    def configure(self, families: tuple, defaults: list) -> None:
        """Refuse image families; fill ``decay`` / ``sink_frame`` left unset from the families' defaults."""
        image = [f.name for f in families if not f.video]
        if image:
            raise ValueError(
                f"radial attention is a video method: its pattern decays with the distance between latent "
                f"frames, and {image[0]!r} attends within one image, where it is dense attention. Use "
                f"method='window' or 'adaspa' for image models (docs/radial.md, 'Image families')."
            )
        missing = [f.name for f, d in zip(families, defaults) if "decay" not in d or "sink_frame" not in d]
        if missing and (self._requested["decay"] is None or self._requested["sink_frame"] is None):
            raise ValueError(
                f"radial has no defaults for family {missing[0]!r}; give decay and sink_frame explicitly"
            )
        decay, sink = self._requested["decay"], self._requested["sink_frame"]
        self.decay = float(family_default(families, "radial", "decay") if decay is None else decay)
        self.sink_frame = family_default(families, "radial", "sink_frame") if sink is None else sink

    def key(self, call: AttentionCall):
        return (call.grid, call.text_len or 0, call.text_position == "first")

    def build(self, call: AttentionCall) -> BlockPlan:
        """The plan of this call's geometry.

        Raises:
            ValueError: no latent grid, a sequence that is not the grid's tokens plus the text, or different
                query and key block sizes.
            RuntimeError: decay or sink_frame unset (not configured by ``apply``).
        """
        if self.decay is None or self.sink_frame is None:
            raise RuntimeError(
                "RadialMethod has no decay / sink_frame: pass them, or install it with dit_accel.apply(...), "
                "which fills them from the model family's defaults"
            )
        grid = call.grid
        if grid is None:
            raise ValueError(
                f"radial needs the latent grid, and {call.layer}'s forward has none (LTX: pass num_frames, "
                f"height and width to the transformer)"
            )
        frames, height, width = grid
        text = call.text_len or 0
        if text and call.text_position not in ("first", "last"):
            raise ValueError(f"radial: text position {call.text_position!r} (expected 'first' or 'last')")
        expected = frames * height * width + text
        if call.q_len != expected or call.k_len != expected:
            raise ValueError(
                f"radial: {call.layer} attends {call.q_len} queries / {call.k_len} keys, but grid {grid} "
                f"with {text} text tokens has {expected}; the radial plan needs the whole frame-major "
                f"sequence"
            )
        if call.block_q != call.block_k:
            raise ValueError(
                f"radial plans use one block size for queries and keys; got block_q={call.block_q}, "
                f"block_k={call.block_k}"
            )
        return build_plan(
            frames,
            height,
            width,
            text_tokens=text,
            text_first=call.text_position == "first",
            block=call.block_q,
            decay=self.decay,
            window=self.window,
            sink_frame=self.sink_frame,
        )


class RadialMethod(ComposedMethod):
    """Radial attention: a static block plan from the latent grid (see the module docstring).

    One plan per geometry (grid, text length and position, block size, device) is built on first use and
    shared by every layer and CFG context of the handle, across runs; a new geometry builds a new plan.
    Dense warm-up steps and dense layers are ``SparseAttentionConfig.dense_steps`` / ``dense_layers``; when
    those are None (the default) they, like ``decay`` and ``sink_frame`` when None, come from the model
    family's ``Family.defaults["radial"]`` (filled in by :meth:`configure`, which :func:`dit_accel.apply`
    calls).

    A call whose plan computes every block (one latent frame, or a grid shorter than the window) runs the
    stock dense op, which is the same attention (stats kind "full_plan"). Image families are refused; a call
    without a latent grid, or whose sequence is not T*H*W video tokens plus the text, raises ValueError.

    Args:
        decay, window, sink_frame: as :class:`RadialPattern`.
        dense_last_steps: the last this-many steps of a run also run dense (0: none). Needs the run's step
            count; when it is unknown those steps run sparse (logged once).
    """

    name = "radial"

    def __init__(
        self,
        decay: float | None = None,
        window: str = "raster",
        sink_frame: bool | None = None,
        dense_last_steps: int = 0,
    ):
        if (
            isinstance(dense_last_steps, bool)
            or not isinstance(dense_last_steps, int)
            or dense_last_steps < 0
        ):
            raise ValueError(f"radial dense_last_steps must be an int >= 0, got {dense_last_steps!r}")
        super().__init__(RadialPattern(decay, window, sink_frame), dense_last_steps=dense_last_steps)

    @property
    def decay(self) -> float | None:
        return self.pattern.decay

    @property
    def sink_frame(self) -> bool | None:
        return self.pattern.sink_frame

    @property
    def window(self) -> str:
        return self.pattern.window

    def configure(self, config: SparseAttentionConfig, families: tuple) -> SparseAttentionConfig:
        if config.block_q is not None and config.block_q != config.block_k:
            raise ValueError(
                f"radial plans use one block size for queries and keys; got block_q={config.block_q}, "
                f"block_k={config.block_k}"
            )
        return super().configure(config, families)
