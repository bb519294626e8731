"""Automatic prompt adherence: does a clip show what its caption of the grammar (:mod:`.data`) asks for?

From raw decoded frames [F, H, W, 3] in [0, 1] (a pipeline's ``output_type="np"`` frames):

- object mask per frame: chromatic pixels (HSV saturation > 0.4, value > 0.3); every background of the
  grammar is achromatic, every object colour is a saturated hue;
- colour: the saturation-weighted circular mean hue of all mask pixels -> nearest of the six hues;
- trajectory: per frame the median mask pixel, then the mean of mask pixels within 2 object radii of it
  (robust to stray chromatic speckles); coordinates in units of the frame's short side;
- motion (trajectory smoothed over 3 frames when it has >= 12): an orbit when both axes span >= 0.25, neither
  span is under 0.4 of the other and the unwrapped angle around the path's centre turns more than half a turn
  (sign: clockwise on screen); otherwise along the axis of larger span, a bounce when the path length is
  > 1.4 x the net displacement (and >= 0.3), else a straight move whose direction is the sign of the net
  displacement (a net move under 0.1 is "still", always wrong);
- shape (measurable when the object's box is >= 8 px and clear of the frame edge in >= 3 frames): median fill
  of the bounding box, < 0.64 triangle (0.5), < 0.88 circle (0.785), else square (1.0);
- size: median sqrt(box area) / short side, < 0.19 small (0.14), else large (0.26);
- background: pixels away from the object: checkered when their luminance std > 0.05, else black (< 0.25),
  white (> 0.75) or gray.

A missing object (chromatic in < 50% of frames) fails colour and motion; shape and size are then not
measurable (None). Attributes a caption leaves out are not scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import BACKGROUNDS, COLOURS, HUES, MOTIONS, SHAPES, SIZES, parse_caption

__all__ = ["ClipObservation", "analyze_clip", "score_clip", "score_clips"]

SAT_MIN = 0.4
VAL_MIN = 0.3
STILL = -1


@dataclass
class ClipObservation:
    """What :func:`analyze_clip` measured; indices into the grammar's tuples, None where not measurable.

    ``motion`` is -1 for an object that does not move. ``trajectory`` is [F, 2] (x, y) in short-side units,
    NaN where the object is missing.
    """

    colour: int | None
    shape: int | None
    size: int | None
    motion: int | None
    background: int | None
    present: float
    trajectory: np.ndarray
    details: dict = field(default_factory=dict)

    def describe(self) -> str:
        def name(values, i):
            return "?" if i is None else ("still" if i == STILL else values[i])

        return (
            f"{name(SIZES, self.size)} {name(COLOURS, self.colour)} {name(SHAPES, self.shape)} "
            f"{name(MOTIONS, self.motion)} on {name(BACKGROUNDS, self.background)} "
            f"(present {self.present:.0%})"
        )


def _as_frames(frames) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames).float()
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3] in [0, 1], got shape {tuple(x.shape)}")
    return x.clamp(0, 1)


def _hsv(x: torch.Tensor):
    mx, _ = x.max(-1)
    mn, _ = x.min(-1)
    delta = mx - mn
    sat = torch.where(mx > 0, delta / mx.clamp_min(1e-6), torch.zeros_like(mx))
    r, g, b = x.unbind(-1)
    d = delta.clamp_min(1e-6)
    h = torch.where(mx == r, ((g - b) / d) % 6, torch.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    return h, sat, mx


def _classify_motion(traj: np.ndarray) -> tuple[int, dict]:
    pts = traj[~np.isnan(traj).any(1)]
    if len(pts) >= 12:
        kernel = np.ones(3) / 3
        pts = np.stack([np.convolve(pts[:, i], kernel, mode="valid") for i in range(2)], 1)
    span = pts.max(0) - pts.min(0)
    info = {"span_x": float(span[0]), "span_y": float(span[1])}
    if min(span) >= 0.25 and min(span) >= 0.4 * max(span):
        rel = pts - pts.mean(0)
        turn = float(np.unwrap(np.arctan2(rel[:, 1], rel[:, 0]))[-1] - np.arctan2(rel[0, 1], rel[0, 0]))
        info["turn"] = turn
        if abs(turn) > math.pi:
            return (6 if turn > 0 else 7), info
    axis = int(np.argmax(span))
    a = pts[:, axis]
    net = float(a[-1] - a[0])
    path = float(np.abs(np.diff(a)).sum())
    info.update(axis="xy"[axis], net=net, path=path)
    if path > 1.4 * abs(net) and path >= 0.3:
        return (4 if axis == 0 else 5), info
    if abs(net) < 0.1:
        return STILL, info
    if axis == 0:
        return (1 if net > 0 else 0), info
    return (3 if net > 0 else 2), info


def analyze_clip(frames) -> ClipObservation:
    """Measure colour, shape, size, motion and background of the moving object in one clip.

    Args:
        frames: [F, H, W, 3] in [0, 1] (numpy or torch), raw decoded frames.
    """
    x = _as_frames(frames)
    n_frames, height, width, _ = x.shape
    short = float(min(height, width))
    hue, sat, val = _hsv(x)
    mask = (sat > SAT_MIN) & (val > VAL_MIN)
    min_px = max(4, int(0.0005 * height * width))
    ys = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width) + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width) + 0.5

    traj = np.full((n_frames, 2), np.nan)
    fills, extents = [], []
    obj = torch.zeros_like(mask)
    for f in range(n_frames):
        m = mask[f]
        count = int(m.sum())
        if count < min_px:
            continue
        mx, my = xs[m], ys[m]
        cx, cy = float(mx.median()), float(my.median())
        radius = max(3.0, math.sqrt(count / math.pi))
        near = m & ((xs - cx) ** 2 + (ys - cy) ** 2 <= (2 * radius) ** 2)
        if int(near.sum()) < min_px:
            continue
        obj[f] = near
        traj[f] = (float(xs[near].mean()) / short, float(ys[near].mean()) / short)
        x0, x1 = float(xs[near].min()) - 0.5, float(xs[near].max()) + 0.5
        y0, y1 = float(ys[near].min()) - 0.5, float(ys[near].max()) + 0.5
        w, h = x1 - x0, y1 - y0
        if min(w, h) >= 8 and x0 > 1 and y0 > 1 and x1 < width - 1 and y1 < height - 1:
            fills.append(int(near.sum()) / (w * h))
            extents.append(math.sqrt(w * h) / short)
    present_frames = ~np.isnan(traj).any(1)
    present = float(present_frames.mean())
    details: dict = {}

    colour = None
    if obj.any():
        h = hue[obj] * (math.pi / 180)
        wts = sat[obj]
        mean = math.atan2(float((wts * torch.sin(h)).sum()), float((wts * torch.cos(h)).sum()))
        deg = math.degrees(mean) % 360
        colour = int(np.argmin([min(abs(deg - hh), 360 - abs(deg - hh)) for hh in HUES]))
        details["hue"] = deg

    motion = None
    if present >= 0.5 and present_frames.sum() >= 3:
        motion, info = _classify_motion(traj)
        details.update(info)

    shape = size = None
    if len(fills) >= 3:
        fill = float(np.median(fills))
        shape = 2 if fill < 0.64 else (0 if fill < 0.88 else 1)
        extent = float(np.median(extents))
        size = 0 if extent < 0.19 else 1
        details.update(fill=fill, extent=extent)

    # Background: pixels outside a dilated object mask, over all frames.
    dilated = torch.nn.functional.max_pool2d(obj.float()[:, None], 9, stride=1, padding=4)[:, 0] > 0
    bg = x[~(dilated | mask)]
    background = None
    if bg.shape[0] >= 16:
        lum = bg @ torch.tensor([0.299, 0.587, 0.114])
        std, med = float(lum.std()), float(lum.median())
        details.update(bg_std=std, bg_median=med)
        background = 3 if std > 0.05 else (0 if med < 0.25 else (1 if med > 0.75 else 2))

    return ClipObservation(colour, shape, size, motion, background, present, traj, details)


def _labels_of(target) -> dict[str, int]:
    if isinstance(target, str):
        labels = parse_caption(target)
        if labels is None:
            raise ValueError(f"not a caption of the tiny model's grammar: {target!r}")
        return labels
    return {k: int(v) for k, v in target.items()}


def score_clip(frames, target) -> dict:
    """Score one clip against a caption (str) or labels ({attribute: index}, omitted ones absent).

    Returns:
        {"correct": {attribute: bool | None (not measurable)}, "score": fraction correct of the measurable
        attributes the caption names, "observation": :class:`ClipObservation`}.
    """
    labels = _labels_of(target)
    obs = analyze_clip(frames)
    correct = {}
    for name in ("colour", "shape", "size", "motion", "background"):
        if name not in labels:
            continue
        got = getattr(obs, name)
        if got is None and name in ("shape", "size", "background") and obs.present >= 0.5:
            correct[name] = None
        else:
            correct[name] = got == labels[name]
    scored = [v for v in correct.values() if v is not None]
    return {"correct": correct, "score": sum(scored) / len(scored) if scored else 0.0, "observation": obs}


def score_clips(clips, targets) -> dict:
    """Score many clips: per-attribute accuracy over the clips where it is measurable, the mean clip score,
    and the fraction of clips with colour, motion and (where measurable) shape all right.

    Args:
        clips: iterable of [F, H, W, 3] frames in [0, 1].
        targets: one caption or labels dict per clip.
    """
    per_attr: dict[str, list[bool]] = {}
    scores, core = [], []
    rows = []
    for frames, target in zip(clips, targets, strict=True):
        r = score_clip(frames, target)
        for k, v in r["correct"].items():
            if v is not None:
                per_attr.setdefault(k, []).append(bool(v))
        scores.append(r["score"])
        c = r["correct"]
        core.append(bool(c.get("colour")) and bool(c.get("motion")) and c.get("shape") is not False)
        rows.append(
            {
                "target": target if isinstance(target, str) else dict(target),
                "correct": c,
                "observed": r["observation"].describe(),
            }
        )
    return {
        "clips": len(scores),
        "accuracy": {k: sum(v) / len(v) for k, v in sorted(per_attr.items())},
        "measured": {k: len(v) for k, v in sorted(per_attr.items())},
        "mean_score": sum(scores) / len(scores) if scores else 0.0,
        "core_all_correct": sum(core) / len(core) if core else 0.0,
        "rows": rows,
    }
