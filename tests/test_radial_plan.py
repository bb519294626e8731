"""Radial attention plan builder: geometry rules, the block reduction, and the fast block path."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from dit_accel.kernels import BlockPlan
from dit_accel.methods import radial
from dit_accel.methods.radial import block_mask, build_plan, reduce_token_mask, token_mask, token_segments


def _brute_force(frames, height, width, **kw):
    """Block mask by materialising the token mask and reducing it with the reference density rule."""
    geo = {k: kw[k] for k in ("text_tokens", "text_first") if k in kw}
    mask = token_mask(frames, height, width, **kw)
    return reduce_token_mask(mask, token_segments(frames, height, width, **geo), kw.get("block", 128))


def _text_block_range(n_tokens, text_tokens, text_first, block):
    lo, hi = (0, text_tokens) if text_first else (n_tokens - text_tokens, n_tokens)
    return lo // block, (hi - 1) // block + 1


# Scaled-down versions of 21x30x52 (no text), 13x30x45 (+226 text first), 33x45x80 (+256 text last),
# plus grids with many short frames (the frame-pair switch at d = 2, 4, 8) and odd sizes.
_SMALL_GRIDS = [
    pytest.param((5, 6, 10), 0, False, id="5x6x10"),
    pytest.param((5, 6, 10), 13, True, id="5x6x10+13first"),
    pytest.param((5, 6, 10), 17, False, id="5x6x10+17last"),
    pytest.param((9, 4, 5), 0, False, id="9x4x5"),
    pytest.param((7, 3, 11), 13, True, id="7x3x11+13first"),
]


@pytest.mark.parametrize("grid,text_tokens,text_first", _SMALL_GRIDS)
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("window", ["raster", "2d"])
def test_plan_equals_token_mask_reduction(grid, text_tokens, text_first, block, window):
    for sink, decay in itertools.product((False, True), (1.0, 0.2)):
        kw = dict(
            text_tokens=text_tokens,
            text_first=text_first,
            block=block,
            decay=decay,
            window=window,
            sink_frame=sink,
        )
        expected = _brute_force(*grid, **kw)
        plan = build_plan(*grid, **kw)
        got = plan.to_block_mask()[0, 0]
        diff = (got ^ expected).nonzero().tolist()
        assert not diff, f"{grid} {kw}: {len(diff)} blocks differ, first {diff[:5]}"
        assert plan.num_kv_blocks == expected.shape[1] == plan.num_q_blocks
        assert got.any(1).all(), f"{grid} {kw}: a query block attends nothing"


@pytest.mark.parametrize(
    "grid,kw",
    [
        pytest.param((6, 12, 20), dict(text_tokens=226, text_first=True), id="6x12x20+226first"),
        pytest.param((4, 16, 24), dict(text_tokens=256, sink_frame=True), id="4x16x24+256last-sink"),
        pytest.param((18, 4, 9), dict(window="2d", decay=0.5, block=64), id="18x4x9-2d-b64"),
    ],
)
def test_plan_equals_token_mask_reduction_block128(grid, kw):
    kw = {"block": 128, **kw}
    assert torch.equal(block_mask(*grid, **kw), _brute_force(*grid, **kw))


def test_frame_pair_windows_follow_reference_formula():
    # s = 3840 (48 x 80): 2^bitlen(s) = 4096; L(d) = 4096 / 2^bitlen(d).
    s, block = 3840, 128
    expected_decay_1 = {
        **{d: ("whole",) for d in (0, 1)},
        **{d: ("raster", 1024) for d in (2, 3)},
        **{d: ("raster", 512) for d in range(4, 8)},
        **{d: ("raster", 256) for d in range(8, 16)},
        **{d: ("raster", 128) for d in range(16, 32)},
        # L = 64 < block: keep every second pair, at one block of width.
        **{d: ("raster", 128) if d % 2 == 0 else ("drop",) for d in range(32, 64)},
        # L = 32: every fourth.
        **{d: ("raster", 128) if d % 4 == 0 else ("drop",) for d in range(64, 128)},
    }
    for d, spec in expected_decay_1.items():
        assert radial._pair_window(d, s, block, 1.0, "raster") == spec, d
    expected_decay_02 = {2: ("raster", 204), 3: ("raster", 204), 4: ("raster", 128), 17: ("raster", 128)}
    for d, spec in expected_decay_02.items():
        assert radial._pair_window(d, s, block, 0.2, "raster") == spec, d
    # 2d: the square of side 2r + 1 closest in area to the strip's 2w + 1 tokens.
    assert radial._pair_window(2, s, block, 1.0, "2d") == ("box", 22)  # 45^2 = 2025 ~ 2049
    assert radial._pair_window(16, s, block, 1.0, "2d") == ("box", 7)  # 15^2 = 225, 17^2 = 289 vs 257
    assert radial._pair_window(33, s, block, 1.0, "2d") == ("drop",)


@pytest.mark.parametrize(
    "tokens,radius", [(1, 0), (2, 0), (5, 0), (6, 1), (9, 1), (257, 7), (2049, 22), (4097, 31), (4226, 32)]
)
def test_square_radius(tokens, radius):
    assert radial._square_radius(tokens) == radius


def test_token_mask_window_shapes():
    # 9 frames of 8 x 16 (s = 128), block 16: L(2) = 256 / 4 = 64, L(4) = 32, L(8) = 16.
    mask = token_mask(9, 8, 16, block=16, decay=1.0)
    s = 128
    pair = lambda i, j: mask[i * s : (i + 1) * s, j * s : (j + 1) * s]
    p = torch.arange(s)
    assert torch.equal(pair(0, 2), (p[:, None] - p[None, :]).abs() <= 64)
    assert torch.equal(pair(7, 3), (p[:, None] - p[None, :]).abs() <= 32)
    assert torch.equal(pair(0, 8), (p[:, None] - p[None, :]).abs() <= 16)
    square = token_mask(9, 8, 16, block=16, decay=1.0, window="2d")
    h, w = p // 16, p % 16
    r = radial._square_radius(2 * 64 + 1)  # 11^2 = 121 ~ 129: r = 5
    box = ((h[:, None] - h[None, :]).abs() <= r) & ((w[:, None] - w[None, :]).abs() <= r)
    assert r == 5 and torch.equal(square[0:s, 2 * s : 3 * s], box)


def test_reduction_rule_thresholds():
    one_frame = torch.zeros(128, dtype=torch.int64)

    def keep(mask, segment=one_frame, block=128):
        return bool(reduce_token_mask(mask, segment, block)[0, 0])

    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[:43] = True  # 43 of 128 rows: 129 > 128, every column dense
    assert keep(mask)
    mask[42] = False  # 42 rows: 126 < 128, no column dense
    assert not keep(mask)
    # 60% of the non-empty columns: 3 dense of 5 is not more than 60%, 4 of 5 is.
    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[:, :3] = True
    mask[0, 3:5] = True
    assert not keep(mask)
    mask[:, 3] = True
    assert keep(mask)
    # Density counts only the query frame's rows of the block: the last block of 100 tokens has 36.
    tail = torch.zeros(100, 100, dtype=torch.bool)
    tail[64:77, 64:] = True  # 13 rows: 39 > 36
    kept = reduce_token_mask(tail, torch.zeros(100, dtype=torch.int64), 64)
    assert kept[1, 1] and not kept[0, 0] and not kept[0, 1] and not kept[1, 0]
    tail[76] = False  # 12 rows: 36, not more than 36
    assert not reduce_token_mask(tail, torch.zeros(100, dtype=torch.int64), 64)[1, 1]
    # Frame pairs are reduced separately and OR-ed, not summed: two frames of 64 tokens in one block,
    # each setting 20 of its 64 rows on the same columns (60 > 64 is false per pair, 120 > 64 if summed).
    two_frames = torch.arange(128) // 64
    mask = torch.zeros(128, 128, dtype=torch.bool)
    mask[0:20, :64] = True
    mask[64:84, :64] = True
    assert not keep(mask, two_frames)
    mask[20, :64] = True  # 21 of frame 0's 64 rows: 63 < 64, still not dense
    assert not keep(mask, two_frames)
    mask[21, :64] = True  # 22 rows: 66 > 64
    assert keep(mask, two_frames)


@pytest.mark.parametrize("window", ["raster", "2d"])
def test_wan_768x1280_69f_published_sparsity(window):
    # 69 frames -> 1 + 68 // 4 = 18 latent frames; 768 / 16 = 48, 1280 / 16 = 80; s = 3840 = 30 blocks.
    plan = build_plan(18, 48, 80, decay=0.2, sink_frame=True, block=128, window=window)
    assert plan.num_q_blocks == plan.num_kv_blocks == 540
    sparsity = 1.0 - plan.density()
    if window == "raster":
        # The reference reports ~71% of blocks skipped (its Wan-only half-frame window at d = 1 gives 73.7%).
        assert abs(sparsity - 0.71) <= 0.01, sparsity
    else:
        assert sparsity > 0.71, sparsity


def test_text_rows_and_columns_always_kept():
    for grid, text, first in [((13, 30, 45), 226, True), ((33, 9, 16), 256, False), ((5, 6, 10), 17, False)]:
        n = grid[0] * grid[1] * grid[2] + text
        for block, window in itertools.product((64, 128), ("raster", "2d")):
            m = block_mask(*grid, text_tokens=text, text_first=first, block=block, decay=0.2, window=window)
            lo, hi = _text_block_range(n, text, first, block)
            assert m[lo:hi].all() and m[:, lo:hi].all(), (grid, block, window)
            assert grid[0] < 13 or not m.all()
    tm = token_mask(5, 6, 10, text_tokens=17, text_first=True, block=16, decay=0.2)
    assert tm[:17].all() and tm[:, :17].all() and not tm[17:, 17:].all()


@pytest.mark.parametrize(
    "grid,text,first,block",
    [
        pytest.param((21, 30, 52), 0, False, 128, id="21x30x52"),
        pytest.param((13, 30, 45), 226, True, 128, id="13x30x45+226first"),
        pytest.param((21, 45, 80), 0, False, 64, id="21x45x80-b64"),
        pytest.param((9, 4, 5), 0, False, 64, id="9x4x5-b64"),
    ],
)
@pytest.mark.parametrize("window", ["raster", "2d"])
def test_adjacent_frames_whole_at_block_level(grid, text, first, block, window):
    frames, s = grid[0], grid[1] * grid[2]
    v0 = text if first else 0
    m = block_mask(*grid, text_tokens=text, text_first=first, block=block, decay=0.05, window=window)
    for i in range(frames):
        for j in range(max(i - 1, 0), min(i + 2, frames)):
            rows = slice((v0 + i * s) // block, (v0 + (i + 1) * s - 1) // block + 1)
            cols = slice((v0 + j * s) // block, (v0 + (j + 1) * s - 1) // block + 1)
            assert m[rows, cols].all(), (i, j)


def test_adjacent_frames_whole_at_token_level():
    s = 60
    for window in ("raster", "2d"):
        tm = token_mask(5, 6, 10, block=16, decay=0.2, window=window)
        for i, j in itertools.product(range(5), repeat=2):
            pair = tm[i * s : (i + 1) * s, j * s : (j + 1) * s]
            assert pair.all() == (abs(i - j) <= 1), (window, i, j)


def test_density_decreases_with_decay():
    decays = [1.5, 1.0, 0.5, 0.2, 0.05]
    for grid, kw in [((21, 30, 52), {}), ((13, 30, 45), dict(text_tokens=226, text_first=True))]:
        for window in ("raster", "2d"):
            dens = [build_plan(*grid, decay=d, window=window, **kw).density() for d in decays]
            assert all(a >= b for a, b in zip(dens, dens[1:])), (grid, window, dens)
            assert dens[0] > dens[-1], (grid, window, dens)
    # At token level a smaller decay gives a subset of the mask.
    wide = token_mask(9, 8, 16, block=16, decay=1.0)
    narrow = token_mask(9, 8, 16, block=16, decay=0.3)
    assert not (narrow & ~wide).any() and (wide & ~narrow).any()


@pytest.mark.parametrize(
    "grid,kw",
    [
        pytest.param((18, 48, 80), dict(decay=0.2), id="18x48x80"),
        pytest.param((18, 48, 80), dict(decay=1.0, text_tokens=256), id="18x48x80+256last"),
        pytest.param((9, 8, 16), dict(block=64, text_tokens=64, text_first=True), id="9x8x16+64first-b64"),
        pytest.param((40, 4, 8), dict(block=32, decay=0.5), id="40x4x8-b32"),
    ],
)
def test_symmetric_when_frames_are_block_aligned(grid, kw):
    m = block_mask(*grid, **kw)
    assert torch.equal(m, m.T)
    with_sink = block_mask(*grid, sink_frame=True, **kw)
    assert not torch.equal(with_sink, with_sink.T)


def test_token_mask_symmetric_without_sink():
    for window, text, first in [("raster", 0, False), ("2d", 13, True), ("raster", 17, False)]:
        tm = token_mask(7, 3, 11, text_tokens=text, text_first=first, block=16, decay=0.5, window=window)
        assert torch.equal(tm, tm.T)


def test_sink_frame_attended_by_every_query():
    s = 60
    tm = token_mask(9, 6, 10, block=16, decay=0.2, sink_frame=True)
    assert tm[:, :s].all()
    assert not token_mask(9, 6, 10, block=16, decay=0.2)[:, :s].all()
    for grid in [(21, 30, 52), (18, 48, 80)]:
        s = grid[1] * grid[2]
        m = block_mask(*grid, decay=0.2, sink_frame=True)
        assert m[:, : (s - 1) // 128 + 1].all(), grid


def test_partial_blocks_any_token_count():
    for grid, text in [((1, 1, 1), 0), ((2, 3, 7), 5), ((16, 2, 2), 0), ((3, 5, 13), 1)]:
        for block in (64, 128):
            n = grid[0] * grid[1] * grid[2] + text
            plan = build_plan(*grid, text_tokens=text, block=block)
            assert plan.num_q_blocks == plan.num_kv_blocks == -(-n // block)
            assert (plan.kv_counts > 0).all()
            assert torch.equal(plan.to_block_mask()[0, 0], _brute_force(*grid, text_tokens=text, block=block))


def test_plan_is_a_blockplan_on_device():
    plan = build_plan(3, 4, 5, text_tokens=7, block=16, device="cpu")
    assert isinstance(plan, BlockPlan)
    assert (plan.batch, plan.heads, plan.block_q, plan.block_k) == (1, 1, 16, 16)
    assert plan.kv_indices.dtype == torch.int32 and plan.device.type == "cpu"


def test_build_plan_is_fast_at_wan14b_720p():
    build_plan(21, 45, 80, decay=0.2, sink_frame=True)
    start = time.perf_counter()
    plan = build_plan(21, 45, 80, decay=0.2, sink_frame=True)
    elapsed = time.perf_counter() - start
    assert plan.num_q_blocks == 591
    # Typically ~0.1 s on one CPU thread; the bound leaves room for a loaded CI machine.
    assert elapsed < 5.0, elapsed


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(frames=0, height=4, width=4),
        dict(frames=2, height=4, width=4, block=0),
        dict(frames=2, height=4, width=4, decay=0.0),
        dict(frames=2, height=4, width=4, window="3d"),
        dict(frames=2, height=4, width=4, text_tokens=-1),
    ],
)
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        build_plan(**kwargs)
