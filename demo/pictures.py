"""Pictures of a run's attention, drawn with Pillow: the block plan of one layer and head at one step, and
the density of every layer over the steps.

Inputs are what a run leaves: the stats records (``AttentionStats.records``: per call context, step, layer,
kind, density) and the saved pattern set (``dit_accel.methods.persist.load_patterns``: per (context, layer)
the plans with the step each was set at). A call the records mark dense computed every block; so did one of
kind ``full_plan`` (a plan that keeps every block at this size, which is not saved).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["RunView", "density_picture", "message_picture", "pattern_picture"]

_BG = (255, 255, 255)
_INK = (31, 41, 55)
_MUTED = (107, 114, 128)
_KEPT = (245, 158, 11)
_SKIPPED = (30, 41, 59)
_FRAME_LINE = (148, 163, 184)
# viridis at 0, 0.25, 0.5, 0.75, 1
_ANCHORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], float)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _colour(value: float) -> tuple[int, int, int]:
    if value is None or math.isnan(value):
        return (229, 231, 235)
    x = min(max(value, 0.0), 1.0) * (len(_ANCHORS) - 1)
    i = min(int(x), len(_ANCHORS) - 2)
    c = _ANCHORS[i] + (x - i) * (_ANCHORS[i + 1] - _ANCHORS[i])
    return tuple(int(round(v)) for v in c)


def _wrap(text: str, font, width: float) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (words kept whole)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and measure.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def _header(draw: ImageDraw.ImageDraw, title: str, subtitle: str, width: int) -> int:
    """Draw the title and the wrapped subtitle; returns the height they take."""
    draw.text((8, 6), title, fill=_INK, font=_font(15))
    y = 28
    for line in _wrap(subtitle, _font(12), width - 16):
        draw.text((8, y), line, fill=_MUTED, font=_font(12))
        y += 16
    return y


def _header_height(subtitle: str, width: int) -> int:
    return 28 + 16 * len(_wrap(subtitle, _font(12), width - 16))


def message_picture(text: str, width: int = 460, height: int = 200) -> Image.Image:
    """A plain picture that says ``text`` (wrapped), for runs without anything to draw."""
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    font = _font(15)
    lines = _wrap(text, font, width - 40)
    y = (height - 20 * len(lines)) // 2
    for ln in lines:
        draw.text(((width - draw.textlength(ln, font=font)) / 2, y), ln, fill=_MUTED, font=font)
        y += 20
    return img


def pattern_picture(
    mask: np.ndarray, title: str, subtitle: str = "", frame_lines: Sequence[float] = (), size: int = 360
) -> Image.Image:
    """The block mask ``mask`` [query blocks, key blocks] (True: computed) as a grid: queries down, keys
    across.

    Args:
        title, subtitle: text above the grid.
        frame_lines: block positions (fractional) where a new latent frame starts, drawn as thin lines.
        size: about the grid's width in pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    nq, nk = mask.shape
    cell = max(2, size // max(nq, nk))
    left, right, bottom = 40, 16, 28
    w = max(left + nk * cell + right, 460)
    top = _header_height(subtitle, w) + 20
    img = Image.new("RGB", (w, top + nq * cell + bottom), _BG)
    draw = ImageDraw.Draw(img)
    _header(draw, title, subtitle, w)
    grid = np.where(mask[..., None], np.array(_KEPT, np.uint8), np.array(_SKIPPED, np.uint8)).astype(np.uint8)
    tile = Image.fromarray(grid, "RGB").resize((nk * cell, nq * cell), Image.NEAREST)
    img.paste(tile, (left, top))
    for pos in frame_lines:
        x, y = left + round(pos * cell), top + round(pos * cell)
        draw.line([(x, top), (x, top + nq * cell - 1)], fill=_FRAME_LINE, width=1)
        draw.line([(left, y), (left + nk * cell - 1, y)], fill=_FRAME_LINE, width=1)
    small = _font(11)
    draw.text((left, top - 15), f"key blocks 0-{nk - 1}", fill=_MUTED, font=small)
    label = Image.new("RGB", (nq * cell, 14), _BG)
    lw = ImageDraw.Draw(label).textlength(f"query blocks 0-{nq - 1}", font=small)
    ImageDraw.Draw(label).text((nq * cell - lw, 0), f"query blocks 0-{nq - 1}", fill=_MUTED, font=small)
    img.paste(label.rotate(90, expand=True), (left - 18, top))
    legend_y = top + nq * cell + 8
    draw.rectangle([left, legend_y, left + 10, legend_y + 10], fill=_KEPT)
    draw.text((left + 14, legend_y - 1), "computed", fill=_MUTED, font=small)
    draw.rectangle([left + 90, legend_y, left + 100, legend_y + 10], fill=_SKIPPED)
    draw.text((left + 104, legend_y - 1), "skipped", fill=_MUTED, font=small)
    if len(frame_lines):
        draw.line([(left + 170, legend_y + 5), (left + 182, legend_y + 5)], fill=_FRAME_LINE, width=1)
        draw.text((left + 186, legend_y - 1), "frame boundary", fill=_MUTED, font=small)
    return img


def density_picture(grid: np.ndarray, title: str, subtitle: str = "", size: int = 420) -> Image.Image:
    """A heat map of ``grid`` [layers, steps] (fraction of blocks computed, NaN: no call), layers down."""
    grid = np.asarray(grid, dtype=float)
    layers, steps = grid.shape
    cw = max(4, min(48, size // max(steps, 1)))
    ch = max(6, min(30, 240 // max(layers, 1)))
    left, bottom = 56, 44
    w = max(left + steps * cw + 70, 460)
    top = _header_height(subtitle, w) + 22
    img = Image.new("RGB", (w, top + layers * ch + bottom), _BG)
    draw = ImageDraw.Draw(img)
    _header(draw, title, subtitle, w)
    small = _font(11)
    for i in range(layers):
        for s in range(steps):
            v = grid[i, s]
            x0, y0 = left + s * cw, top + i * ch
            draw.rectangle([x0, y0, x0 + cw - 2, y0 + ch - 2], fill=_colour(v))
            if cw >= 30 and ch >= 14 and not math.isnan(v):
                text = f"{v:.2f}"
                ink = _INK if v > 0.6 else (255, 255, 255)
                tw = draw.textlength(text, font=small)
                draw.text((x0 + (cw - 1 - tw) / 2, y0 + (ch - 14) / 2), text, fill=ink, font=small)
        if ch >= 10 or i % 5 == 0:
            draw.text(
                (left - 8 - draw.textlength(str(i), font=small), top + i * ch + (ch - 14) / 2),
                str(i),
                fill=_MUTED,
                font=small,
            )
    every = max(1, math.ceil(16 / cw))
    for s in range(0, steps, every):
        tx = left + s * cw + (cw - draw.textlength(str(s), font=small)) / 2
        draw.text((tx, top + layers * ch + 2), str(s), fill=_MUTED, font=small)
    draw.text((left, top + layers * ch + 20), "denoising step", fill=_MUTED, font=small)
    draw.text((8, top - 16), "layer", fill=_MUTED, font=small)
    bar_x = left + steps * cw + 16
    bar_h = max(layers * ch - 2, 40)
    for y in range(bar_h):
        draw.line([(bar_x, top + y), (bar_x + 12, top + y)], fill=_colour(1 - y / max(bar_h - 1, 1)))
    draw.text((bar_x + 16, top - 2), "1.0", fill=_MUTED, font=small)
    draw.text((bar_x + 16, top + bar_h - 12), "0.0", fill=_MUTED, font=small)
    return img


@dataclass
class RunView:
    """What a run leaves for its pictures: stats records and the saved patterns (or None).

    Attributes:
        records: ``AttentionStats.records`` of the run.
        patterns: a :class:`dit_accel.methods.persist.LoadedPatterns`, or None (dense runs, plans that keep
            every block, or a run that set no plan).
        method: the method's description, for titles.
    """

    records: list[dict]
    patterns: object | None
    method: str

    @property
    def contexts(self) -> list[str]:
        seen = list(dict.fromkeys(r["context"] for r in self.records))
        return sorted(seen, key=lambda c: (c != "cond", seen.index(c)))

    @property
    def context(self) -> str | None:
        return self.contexts[0] if self.contexts else None

    @property
    def layers(self) -> list[str]:
        """Replaced layers in call order."""
        return list(dict.fromkeys(r["layer"] for r in self.records if r["context"] == self.context))

    @property
    def steps(self) -> int:
        return 1 + max((r["step"] for r in self.records), default=-1)

    @property
    def heads(self) -> int:
        """Heads the saved plans distinguish (1 when a plan is shared by every head, or none is saved)."""
        if self.patterns is None:
            return 1
        return max(int(p.kv_counts.shape[1]) for hist in self.patterns.plans.values() for _, _, p in hist)

    def density_grid(self) -> np.ndarray:
        """[layers, steps] mean density of the context's calls (dense calls 1.0; NaN where none)."""
        layers = {name: i for i, name in enumerate(self.layers)}
        total = np.zeros((len(layers), self.steps))
        count = np.zeros_like(total)
        for r in self.records:
            if r["context"] != self.context or r["layer"] not in layers:
                continue
            d = 1.0 if r["kind"] == "dense" else r["density"]
            if d is None or math.isnan(d):
                continue
            total[layers[r["layer"]], r["step"]] += d
            count[layers[r["layer"]], r["step"]] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)

    def density_image(self) -> Image.Image:
        if not self.records:
            return message_picture("No attention calls were recorded.")
        grid = self.density_grid()
        sparse = [r for r in self.records if r["kind"] != "dense" and r["context"] == self.context]
        note = (
            f"{len(sparse)} of {sum(r['context'] == self.context for r in self.records)} calls sparse"
            if sparse
            else "every call dense"
        )
        return density_picture(
            grid,
            "Blocks computed per layer and step",
            f"{self.method}; context {self.context}; dense calls count 1.0; {note}",
        )

    def _kind(self, layer: str, step: int) -> str | None:
        for r in self.records:
            if r["context"] == self.context and r["layer"] == layer and r["step"] == step:
                return r["kind"]
        return None

    def pattern_image(self, layer: int, head: int, step: int) -> Image.Image:
        """The blocks ``layer`` (an index into :attr:`layers`) computed for ``head`` at ``step``."""
        if not self.records:
            return message_picture("No attention calls were recorded.")
        layer = min(max(int(layer), 0), len(self.layers) - 1)
        step = min(max(int(step), 0), self.steps - 1)
        name = self.layers[layer]
        kind = self._kind(name, step)
        where = f"layer {layer}, step {step}"
        history = self.patterns.plans.get((self.context, name)) if self.patterns is not None else None
        in_force = [h for h in history or () if h[0] <= step]
        if kind == "dense" or kind is None or not in_force:
            why = {
                "dense": "a dense step for this layer (warm-up, a dense layer or a refresh)",
                "full_plan": "the plan keeps every block at this size",
                None: "no call recorded",
            }.get(kind, "no plan was set yet")
            if history is None and kind not in ("dense", None, "full_plan"):
                why = "this method saved no plan for it"
            return message_picture(f"{where}: every block computed ({why}).")
        set_at, geometry, plan = in_force[-1]
        masks = plan.to_block_mask()  # [B|1, H|1, nq, nk]
        h = min(max(int(head), 0), masks.shape[1] - 1)
        mask = masks[0, h].cpu().numpy()
        shared = " (one plan for every head)" if masks.shape[1] == 1 else ""
        frame_lines = _frame_lines(geometry)
        kept = mask.sum()
        title = f"Attention pattern: {where}, head {h}{shared}"
        subtitle = (
            f"{kind}; plan set at step {set_at}; {kept} of {mask.size} blocks computed "
            f"({kept / mask.size:.0%}); {geometry.get('block_q')}-token blocks; context {self.context}"
        )
        return pattern_picture(mask, title, subtitle, frame_lines)


def _frame_lines(geometry: dict) -> list[float]:
    """Block positions where a latent frame starts (video grids only)."""
    grid, block = geometry.get("grid"), geometry.get("block_q")
    if not grid or len(grid) != 3 or not block:
        return []
    per_frame = grid[1] * grid[2]
    offset = (geometry.get("text_len") or 0) if geometry.get("text_position") == "first" else 0
    return [(offset + t * per_frame) / block for t in range(1, grid[0])]
