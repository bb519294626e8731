"""Procedural text-to-video data: one coloured shape moving over a simple background, with a caption.

Every clip is rendered on the fly (CPU or CUDA, vectorised over the batch) from labels and continuous
parameters drawn from a seeded CPU ``torch.Generator``, so a (seed, batch size, geometry) triple gives the
same clips on any device up to float rounding.

Grammar (every word is in the tokenizer's vocabulary)::

    a [SIZE] COLOUR SHAPE MOTION [on a BACKGROUND background]

    SIZE        small | large
    COLOUR      red | yellow | green | cyan | blue | magenta        (hues 0, 60, ..., 300 degrees)
    SHAPE       circle | square | triangle                           (fill of the bounding box 0.79, 1, 0.5)
    MOTION      moving left | moving right | moving up | moving down
                | bouncing left and right | bouncing up and down
                | orbiting clockwise | orbiting counterclockwise
    BACKGROUND  black | white | gray | checkered                     (all achromatic)

Motion is defined over normalised clip time t in [0, 1], so a 17-frame and a 49-frame clip show the same path:
a straight move covers 45-60% of the free span; a bounce travels 1.6-2.4 spans between the walls (at least one
visible reversal, both legs >= 0.6 span); an orbit circles the frame centre at radius 0.20-0.26 of the short
side for 0.8-1.1 turns. Clockwise is on screen (image y points down). Sizes are the half-extent of the shape's
bounding box: 0.07 (small) or 0.13 (large) of the short side, the same box for every shape.

A fixed 10% of the full attribute combinations is held out (:data:`HELD_OUT`): training never renders them and
the adherence evaluation prompts come from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "ClipBatch",
    "HELD_OUT",
    "HUES",
    "MOTIONS",
    "NUM_COMBOS",
    "SHAPES",
    "SIZES",
    "SIZE_FRACTIONS",
    "caption",
    "combo_index",
    "held_out_prompts",
    "parse_caption",
    "render",
    "sample_batch",
    "sample_labels",
    "to_frames",
    "vocabulary",
]

SIZES = ("small", "large")
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
SHAPES = ("circle", "square", "triangle")
MOTIONS = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "bouncing left and right",
    "bouncing up and down",
    "orbiting clockwise",
    "orbiting counterclockwise",
)
BACKGROUNDS = ("black", "white", "gray", "checkered")
ATTRIBUTES = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "motion": MOTIONS, "background": BACKGROUNDS}

HUES = tuple(60.0 * i for i in range(len(COLOURS)))
SIZE_FRACTIONS = (0.07, 0.13)
NUM_COMBOS = len(COLOURS) * len(SHAPES) * len(SIZES) * len(MOTIONS) * len(BACKGROUNDS)


def combo_index(colour, shape, size, motion, background):
    """Index in [0, NUM_COMBOS) of a full attribute combination (ints or integer tensors)."""
    return (((colour * len(SHAPES) + shape) * len(SIZES) + size) * len(MOTIONS) + motion) * len(
        BACKGROUNDS
    ) + background


def _held_out_table() -> torch.Tensor:
    # A fixed multiplicative hash picks 10% of the combinations, spread over every attribute value.
    idx = torch.arange(NUM_COMBOS, dtype=torch.int64)
    return ((idx * 2654435761) % (2**32) >> 7) % 10 == 0


HELD_OUT = _held_out_table()


def vocabulary() -> list[str]:
    """Every word the grammar can produce, sorted (the tokenizer adds its special tokens first)."""
    words = {"a", "on", "background"}
    for values in ATTRIBUTES.values():
        for phrase in values:
            words.update(phrase.split())
    return sorted(words)


def caption(labels: dict, i: int = 0, with_size: bool = True, with_background: bool = True) -> str:
    """The caption of sample ``i`` of ``labels`` (a dict of int tensors or ints)."""

    def get(name):
        v = labels[name]
        return int(v[i]) if torch.is_tensor(v) else int(v)

    words = ["a"]
    if with_size:
        words.append(SIZES[get("size")])
    words += [COLOURS[get("colour")], SHAPES[get("shape")], MOTIONS[get("motion")]]
    if with_background:
        words += ["on", "a", BACKGROUNDS[get("background")], "background"]
    return " ".join(words)


def parse_caption(text: str) -> dict[str, int] | None:
    """Labels a caption of the grammar names (omitted size/background are absent); None if not a caption."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    if not words or words[0] != "a":
        return None
    out: dict[str, int] = {}
    pos = 1
    if pos < len(words) and words[pos] in SIZES:
        out["size"] = SIZES.index(words[pos])
        pos += 1
    for name, values in (("colour", COLOURS), ("shape", SHAPES)):
        if pos >= len(words) or words[pos] not in values:
            return None
        out[name] = values.index(words[pos])
        pos += 1
    for m, phrase in enumerate(MOTIONS):
        n = len(phrase.split())
        if words[pos : pos + n] == phrase.split():
            out["motion"] = m
            pos += n
            break
    else:
        return None
    if pos == len(words):
        return out
    if words[pos : pos + 2] == ["on", "a"] and len(words) == pos + 4 and words[pos + 3] == "background":
        if words[pos + 2] in BACKGROUNDS:
            out["background"] = BACKGROUNDS.index(words[pos + 2])
            return out
    return None


def sample_labels(batch: int, generator: torch.Generator, split: str = "train") -> dict[str, torch.Tensor]:
    """Attribute labels [batch] (int64, CPU). ``split``: "train" never yields a held-out combination,
    "held_out" only held-out ones, "all" anything."""
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    if split == "held_out":
        pool = torch.nonzero(HELD_OUT).flatten()
        idx = pool[torch.randint(len(pool), (batch,), generator=generator)]
    elif split == "train":
        pool = torch.nonzero(~HELD_OUT).flatten()
        idx = pool[torch.randint(len(pool), (batch,), generator=generator)]
    else:
        idx = torch.randint(NUM_COMBOS, (batch,), generator=generator)
    out = {}
    for name, values in reversed(
        (
            ("colour", COLOURS),
            ("shape", SHAPES),
            ("size", SIZES),
            ("motion", MOTIONS),
            ("background", BACKGROUNDS),
        )
    ):
        out[name] = idx % len(values)
        idx = idx // len(values)
    return {k: out[k] for k in ("colour", "shape", "size", "motion", "background")}


def held_out_prompts(
    n: int = 64, seed: int = 1234, split: str = "held_out"
) -> list[tuple[str, dict[str, int]]]:
    """``n`` distinct held-out full captions with their labels, in a fixed order; ``split="train"``: captions
    of combinations the model is trained on instead (to tell failing to learn from failing to generalise)."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    pool = torch.nonzero(HELD_OUT if split == "held_out" else ~HELD_OUT).flatten()
    if n > len(pool):
        raise ValueError(f"only {len(pool)} {split} combinations exist, asked for {n}")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    out = []
    for idx in pool[order].tolist():
        labels = {}
        for name, values in (
            ("background", BACKGROUNDS),
            ("motion", MOTIONS),
            ("size", SIZES),
            ("shape", SHAPES),
            ("colour", COLOURS),
        ):
            labels[name] = idx % len(values)
            idx //= len(values)
        out.append((caption(labels), labels))
    return out


def _uniform(batch, lo, hi, g):
    return lo + (hi - lo) * torch.rand(batch, generator=g, dtype=torch.float64)


def _trajectory(labels, frames, height, width, g) -> torch.Tensor:
    """Object centres [B, F, 2] (x, y) in pixels, float64 on CPU."""
    batch = labels["motion"].shape[0]
    s = min(height, width)
    r = torch.tensor(SIZE_FRACTIONS, dtype=torch.float64)[labels["size"]] * s
    m = r + 2.0
    t = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)[None, :] if frames > 1 else torch.zeros(1, 1)
    motion = labels["motion"]
    u_a, u_b, u_c, u_d, u_e = (_uniform(batch, 0, 1, g) for _ in range(5))
    sign = torch.where(torch.rand(batch, generator=g) < 0.5, -1.0, 1.0).double()

    horizontal = (motion == 0) | (motion == 1) | (motion == 4)
    size_along = torch.where(horizontal, torch.full_like(m, width), torch.full_like(m, height))
    size_across = torch.where(horizontal, torch.full_like(m, height), torch.full_like(m, width))
    span = size_along - 2 * m
    across = m + u_a * (size_across - 2 * m)

    # straight: travel 45-60% of the free span, starting where the whole path fits
    travel = (0.45 + 0.15 * u_b) * span
    start = m + u_c * (span - travel)
    forward = (motion == 1) | (motion == 3)  # right, down: increasing coordinate
    straight = torch.where(
        forward[:, None],
        start[:, None] + travel[:, None] * t,
        (start + travel)[:, None] - travel[:, None] * t,
    )
    # bouncing: reflect a uniform motion of 1.6-2.4 spans between the walls
    total = (1.6 + 0.8 * u_b) * span
    p = (u_c * span)[:, None] + (sign * total)[:, None] * t
    q = torch.remainder(p, 2 * span[:, None])
    bounce = m[:, None] + torch.where(q <= span[:, None], q, 2 * span[:, None] - q)

    along = torch.where((motion >= 4)[:, None], bounce, straight)
    across = across[:, None].expand_as(along)
    xy_line = torch.where(
        horizontal[:, None, None], torch.stack([along, across], -1), torch.stack([across, along], -1)
    )

    # orbit around the frame centre; angle grows clockwise on screen (y down)
    radius = (0.20 + 0.06 * u_a) * s
    cx = width / 2 + (u_c - 0.5) * 0.1 * s
    cy = height / 2 + (u_e - 0.5) * 0.1 * s
    theta0 = 2 * math.pi * u_b
    turns = 0.8 + 0.3 * u_d
    direction = torch.where(motion == 6, 1.0, -1.0).double()
    theta = theta0[:, None] + (direction * turns * 2 * math.pi)[:, None] * t
    xy_orbit = torch.stack(
        [cx[:, None] + radius[:, None] * torch.cos(theta), cy[:, None] + radius[:, None] * torch.sin(theta)],
        -1,
    )
    return torch.where((motion >= 6)[:, None, None], xy_orbit, xy_line)


def _hsv_to_rgb(h, s, v):
    # h in degrees, tensors [B]
    k = torch.stack([(5 + h / 60) % 6, (3 + h / 60) % 6, (1 + h / 60) % 6], -1)
    return v[:, None] - (v * s)[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


@dataclass
class ClipBatch:
    """A batch of clips.

    Attributes:
        video: [B, 3, F, H, W] in [-1, 1] (the VAE's input convention), on the requested device.
        captions: B strings of the grammar.
        labels: attribute -> int64 [B] (CPU): colour, shape, size, motion, background.
        mentioned: attribute -> bool [B]: whether the caption names it (size and background may be omitted).
        centers: [B, F, 2] object centres (x, y) in pixels, float32 CPU.
    """

    video: torch.Tensor
    captions: list[str]
    labels: dict[str, torch.Tensor]
    mentioned: dict[str, torch.Tensor]
    centers: torch.Tensor


def render(
    labels: dict[str, torch.Tensor],
    frames: int,
    height: int,
    width: int,
    generator: torch.Generator,
    device="cpu",
    dtype=torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render clips for ``labels``; continuous parameters come from ``generator`` (CPU).

    Returns:
        (video [B, 3, F, H, W] in [-1, 1] on ``device``, centres [B, F, 2] in pixels, float32 CPU).
    """
    batch = labels["colour"].shape[0]
    centers = _trajectory(labels, frames, height, width, generator)
    hue = torch.tensor(HUES, dtype=torch.float64)[labels["colour"]] + _uniform(batch, -8, 8, generator)
    rgb = _hsv_to_rgb(hue, _uniform(batch, 0.85, 1.0, generator), _uniform(batch, 0.85, 1.0, generator))
    bg = labels["background"]
    level = torch.tensor([0.04, 0.96, 0.5, 0.25], dtype=torch.float64)[bg] + _uniform(
        batch, -0.04, 0.04, generator
    )
    cell = min(height, width) / 6
    phase = torch.randint(0, 2, (batch,), generator=generator)

    s = min(height, width)
    r = (torch.tensor(SIZE_FRACTIONS, dtype=torch.float64)[labels["size"]] * s).to(device, dtype)
    ys = torch.arange(height, device=device, dtype=dtype)[:, None] + 0.5
    xs = torch.arange(width, device=device, dtype=dtype)[None, :] + 0.5
    c = centers.to(device, dtype)
    dx = xs[None, None] - c[..., 0, None, None]  # [B, F, H, W]
    dy = ys[None, None] - c[..., 1, None, None]
    rb = r[:, None, None, None]
    d_circle = torch.sqrt(dx * dx + dy * dy) - rb
    d_square = torch.maximum(dx.abs(), dy.abs()) - rb
    inv5 = 1.0 / math.sqrt(5.0)
    d_tri = torch.maximum(torch.maximum((2 * dx - dy - rb) * inv5, (-2 * dx - dy - rb) * inv5), dy - rb)
    shape = labels["shape"].to(device)[:, None, None, None]
    dist = torch.where(shape == 0, d_circle, torch.where(shape == 1, d_square, d_tri))
    alpha = torch.clamp(0.5 - dist, 0.0, 1.0)[:, None]  # [B, 1, F, H, W]

    checker = ((torch.floor(ys / cell) + torch.floor(xs / cell)) % 2)[None]  # [1, H, W]
    checker = (checker + phase.to(device, dtype)[:, None, None]) % 2
    base = level.to(device, dtype)[:, None, None]
    background = torch.where((bg == 3).to(device)[:, None, None], base + 0.2 * checker, base)  # [B, H, W]
    background = background[:, None, None].expand(batch, 3, 1, height, width)
    colour = rgb.to(device, dtype)[:, :, None, None, None]
    video = background * (1 - alpha) + colour * alpha
    return (video * 2 - 1).clamp(-1, 1), centers.float()


def sample_batch(
    batch: int,
    frames: int,
    height: int,
    width: int,
    generator: torch.Generator,
    device="cpu",
    split: str = "train",
    omit_prob: float = 0.0,
    dtype=torch.float32,
) -> ClipBatch:
    """Sample labels and captions and render them.

    Args:
        batch, frames, height, width: clip geometry; ``video`` is [batch, 3, frames, height, width].
        generator: a CPU ``torch.Generator``; all randomness comes from it, in a fixed order.
        device: where the video is rendered.
        split: "train" (no held-out combination), "held_out" or "all" (see :func:`sample_labels`).
        omit_prob: probability that the caption leaves out the size, and independently the background.
    """
    labels = sample_labels(batch, generator, split)
    keep_size = torch.rand(batch, generator=generator) >= omit_prob
    keep_bg = torch.rand(batch, generator=generator) >= omit_prob
    captions = [caption(labels, i, bool(keep_size[i]), bool(keep_bg[i])) for i in range(batch)]
    video, centers = render(labels, frames, height, width, generator, device, dtype)
    mentioned = {
        "colour": torch.ones(batch, dtype=torch.bool),
        "shape": torch.ones(batch, dtype=torch.bool),
        "motion": torch.ones(batch, dtype=torch.bool),
        "size": keep_size,
        "background": keep_bg,
    }
    return ClipBatch(video, captions, labels, mentioned, centers)


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> [B, F, H, W, 3] in [0, 1] (the layout of a pipeline's ``np`` output)."""
    return ((video.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
